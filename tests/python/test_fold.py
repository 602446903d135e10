"""Folding BatchNorm away: bnorm.fold_weights (the C++ algebra) and bnorm.torch.fold (torch.fx),
checked against the unfolded model run in float64 (tests/python/test_fold_onnx.py: bnorm.onnx.fold)."""

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import bnorm
import bnorm.torch as bt

torchvision = pytest.importorskip("torchvision")

_BN_TYPES = (nn.modules.batchnorm._BatchNorm, bt.FrozenBatchNorm)


def randomize(model, seed=0):
    """Random running statistics and affine parameters for every BN, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


def count_bns(model):
    return sum(isinstance(m, _BN_TYPES) for m in model.modules())


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_fold_completely(name):
    model = randomize(getattr(torchvision.models, name)())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folded, report = bt.fold(model, (x,), return_report=True)
    assert count_bns(folded) == 0
    assert report and all(": folded into " in line for line in report)
    with torch.no_grad():
        assert relative(folded(x), model(x)) < 1e-5
    assert count_bns(model) > 0  # the model passed in is unchanged


def test_bnorm_batchnorms_fold_and_the_report_is_logged(caplog):
    model = randomize(bt.convert(torchvision.models.resnet18()))
    x = torch.randn(1, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="bnorm.torch"):
        folded = bt.fold(model, x)
    assert count_bns(folded) == 0
    assert "bnorm.torch.fold: layer4.1.bn2: folded into layer4.1.conv2 (Conv2d), which it follows" in caplog.messages
    with torch.no_grad():
        assert relative(folded(x), model(x)) < 1e-5


# Layer + BN patterns that fold, each checked in float64 (against the unfolded model in float64) and
# in float32.
FOLDING = {
    "conv2d grouped dilated no bias": (
        lambda: nn.Sequential(nn.Conv2d(6, 9, 3, groups=3, dilation=2, padding=1, bias=False), nn.BatchNorm2d(9)),
        (2, 6, 9, 8)),
    "convtranspose1d groups stride": (
        lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.BatchNorm1d(6)), (2, 4, 7)),
    "convtranspose2d groups stride dilation": (
        lambda: nn.Sequential(nn.ConvTranspose2d(6, 9, (3, 2), stride=(2, 3), groups=3, dilation=(1, 2),
                                                 padding=1, bias=False), nn.BatchNorm2d(9)), (2, 6, 5, 4)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(3, 4, (2, 3, 1), stride=(1, 2, 1)), nn.BatchNorm3d(4)), (2, 3, 4, 6, 3)),
    "linear + batchnorm1d on (N, C)": (lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5)),
    "bn before an unpadded conv": (
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2)), (2, 4, 9, 9)),
    "bn before a linear on (N, C)": (lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5)),
    "bn without affine": (lambda: nn.Sequential(nn.Conv1d(3, 4, 2), nn.BatchNorm1d(4, affine=False)), (2, 3, 6)),
}


@pytest.mark.parametrize("case", list(FOLDING))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patterns_fold_exactly(case, dtype):
    make, shape = FOLDING[case]
    torch.manual_seed(3)
    model = randomize(make().to(dtype))
    x = torch.randn(shape, dtype=dtype)
    folded, report = bt.fold(model, (x,), return_report=True)
    assert count_bns(folded) == 0, report
    with torch.no_grad():
        reference = model.double()(x.double())
        assert relative(folded(x).double(), reference) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_conv_weights_match_torch_fuse_conv_bn_eval():
    torch.manual_seed(4)
    conv, bn = nn.Conv2d(4, 8, 3, groups=2, bias=False), nn.BatchNorm2d(8)
    model = randomize(nn.Sequential(conv, bn))
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(copy.deepcopy(conv).eval(), copy.deepcopy(bn))
    folded = bt.fold(model)
    torch.testing.assert_close(folded.get_submodule("0").weight, fused.weight, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(folded.get_submodule("0").bias, fused.bias, rtol=2e-7, atol=1e-7)


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


# Patterns that must not fold: (model, input shape, what the report says).
NOT_FOLDING = {
    "linear on (N, C, L), sizes matching": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (2, 4, 4), "gets inputs of rank 3"),
    "conv output with a second user": (TwoUsers, (2, 3, 6, 6), "is used by 2 nodes"),
    "bn before a padded conv": (
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 5, 5),
        "which pads its input"),
    "bn before a convtranspose": (
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3), nn.ConvTranspose1d(3, 4, 2)), (2, 3, 5),
        "cannot absorb a BN in front of it"),
    "a conv called twice": (CalledTwice, (2, 3, 4, 4), "conv (Conv2d)"),
    "bn after a relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), (2, 3, 4, 4),
                        "no Conv, ConvTranspose or Linear produces its input"),
}


@pytest.mark.parametrize("case", list(NOT_FOLDING))
def test_cases_that_cannot_fold_are_left_as_frozen_affines(case):
    make, shape, why = NOT_FOLDING[case]
    torch.manual_seed(5)
    model = randomize(make().double())
    x = torch.randn(shape, dtype=torch.float64)
    folded, report = bt.fold(model, (x,), return_report=True)
    left = [line for line in report if ": left as FrozenBatchNorm" in line]
    assert len(left) == len(report) and all(why in line for line in left), report
    assert sum(isinstance(m, bt.FrozenBatchNorm) for m in folded.modules()) == len(left)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()) == 0
    with torch.no_grad():
        assert relative(folded(x), model(x)) < 1e-12


def test_linear_without_example_inputs_is_left_and_says_why():
    model = randomize(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)))
    folded, report = bt.fold(model, return_report=True)
    assert report == ["1: left as FrozenBatchNorm: 0 (Linear): its input's shape is unknown (pass example_inputs)"]
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert relative(folded(x), model(x)) < 1e-6


def test_batchnorm_without_running_statistics_is_left_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    folded, report = bt.fold(model, return_report=True)
    assert report == ["1: left: it has no running statistics, so eval uses batch statistics"]
    assert isinstance(folded.get_submodule("1"), nn.BatchNorm2d)


@pytest.mark.parametrize("var", [0.0, 1e-12, 1e-7])
def test_running_var_near_zero(var):
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, eps=1e-5)).double())
    model[1].running_var.fill_(var)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    folded = bt.fold(model)
    with torch.no_grad():
        assert relative(folded(x), model(x)) < 1e-12


def test_bfloat16_conv_keeps_its_dtype():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(torch.bfloat16)
    folded = bt.fold(model)
    conv = folded.get_submodule("0")
    assert conv.weight.dtype == torch.bfloat16 and conv.bias.dtype == torch.bfloat16
    # Each folded weight is the bfloat16 nearest to the float64 product.
    bn = model[1]
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    exact = model[0].weight.double() * scale.reshape(-1, 1, 1, 1)
    err = (conv.weight.double() - exact).abs()
    ulp = exact.abs() * 2.0 ** -8  # at most half a bfloat16 ulp (2^-7 relative)
    assert bool((err <= ulp).all())


def test_fold_weights_errors_name_the_argument():
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"bnorm::fold_into_producer: bn.running_var: expected 4 values"):
        bnorm.fold_weights(w, None, np.zeros(4, np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"layout: expected 'out_in' or 'in_out', got 'x'"):
        bnorm.fold_weights(w, None, np.zeros(4), np.ones(4), layout="x")
    with pytest.raises(TypeError, match=r"weight must be a numpy.ndarray or a torch.Tensor"):
        bnorm.fold_weights([1.0], None, np.zeros(4), np.ones(4))


# ----------------------------------------------------------------------------------------------
# FrozenBatchNorm2d


def test_frozen_batchnorm2d_has_torchvisions_semantics():
    from torchvision.ops import FrozenBatchNorm2d as Reference

    frozen, reference = bt.FrozenBatchNorm2d(5), Reference(5)
    assert list(dict(frozen.named_buffers())) == ["weight", "bias", "running_mean", "running_var"]
    assert list(frozen.parameters()) == [] and frozen.eps == 1e-5
    assert repr(frozen) == repr(reference) == "FrozenBatchNorm2d(5, eps=1e-05)"
    bn = randomize(nn.BatchNorm2d(5))
    state = bn.state_dict()  # with num_batches_tracked, which both drop
    frozen.load_state_dict(state)
    reference.load_state_dict(state)
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(frozen(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
    assert list(frozen.state_dict()) == list(reference.state_dict())



class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this module
            return self.block(x)
        return -self.block(x)


def test_untraceable_model_warns_and_folds_its_children():
    model = randomize(Untraceable())
    with pytest.warns(UserWarning, match=r"the model \(Untraceable\) cannot be traced by torch.fx"):
        folded, report = bt.fold(model, return_report=True)
    assert report == ["block.1: folded into block.0 (Conv2d), which it follows"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert relative(folded(x), model(x)) < 1e-5
        assert relative(folded(-x.abs()), model(-x.abs())) < 1e-5


def test_frozen_batchnorms_fold_too():
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    torch.manual_seed(6)
    bn = randomize(nn.BatchNorm2d(4))
    frozen, ours = TorchvisionFrozen(4), bt.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    ours.load_state_dict(bn.state_dict())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.ReLU(), ours).eval()
    folded, report = bt.fold(model, return_report=True)
    assert report == ["1: folded into 0 (Conv2d), which it follows",
                      "3: left: no Conv, ConvTranspose or Linear produces its input or consumes its output"]
    assert not any(isinstance(m, TorchvisionFrozen) for m in folded.modules())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative(folded(x), model(x)) < 1e-5
