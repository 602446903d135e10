"""bnorm.torch.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d, state_dict, convert()."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import bnorm.torch as bt
from _helpers import channels_last_torch, close

CLASSES = {
    "1d-rank2": (bt.BatchNorm1d, nn.BatchNorm1d, (6, 5)),
    "1d-rank3": (bt.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7)),
    "2d": (bt.BatchNorm2d, nn.BatchNorm2d, (3, 5, 4, 6)),
    "3d": (bt.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 3)),
}
CONFIGS = {
    "default": {},
    "momentum=None": dict(momentum=None),
    "momentum=0.5": dict(momentum=0.5),
    "affine=False": dict(affine=False),
    "bias=False": dict(bias=False),
    "track_running_stats=False": dict(track_running_stats=False),
    "eps=1e-3, no affine, no tracking": dict(eps=1e-3, affine=False, track_running_stats=False),
}


def _layout(x, layout):
    return channels_last_torch(x) if layout == "channels_last" and x.dim() > 2 else x


def _pair(kind, config, dtype):
    ours_cls, torch_cls, shape = CLASSES[kind]
    ours = ours_cls(shape[1], dtype=dtype, **CONFIGS[config])
    ref = torch_cls(shape[1], dtype=dtype, **CONFIGS[config])
    with torch.no_grad():  # start from non-trivial parameters
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, shape


def _compare_state(ours, ref, dtype):
    for (name, a), (rname, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert name == rname
        if b.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            close(a, b, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", CLASSES)
def test_training_steps_and_eval_match_torch(kind, config, dtype, layout):
    torch.manual_seed(hash((kind, config, layout)) % 10_000)
    ours, ref, shape = _pair(kind, config, dtype)
    params = list(ours.parameters())
    opt = torch.optim.SGD(params or [torch.zeros(1)], lr=0.1)
    ref_opt = torch.optim.SGD(list(ref.parameters()) or [torch.zeros(1)], lr=0.1)
    for step in range(4):
        ours.train(step != 2)  # one eval step in between
        ref.train(step != 2)
        x = _layout(torch.randn(shape, dtype=dtype) * 2 + 1, layout).requires_grad_()
        rx = x.detach().clone().requires_grad_()
        y, ry = ours(x), ref(rx)
        close(y, ry, dtype)
        g = torch.randn_like(ry)
        (y * g).sum().backward()
        (ry * g).sum().backward()
        close(x.grad, rx.grad, dtype, grad=True)
        for p, rp in zip(ours.parameters(), ref.parameters()):
            close(p.grad, rp.grad, dtype, grad=True)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        _compare_state(ours, ref, dtype)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        x = _layout(torch.randn(shape, dtype=dtype), layout)
        close(ours(x), ref(x), dtype)


def test_modules_are_torch_modules():
    bn = bt.BatchNorm2d(8)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(bn, nn.Module)
    assert repr(bn) == repr(nn.BatchNorm2d(8))
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    assert bn.num_batches_tracked.dtype == torch.int64
    clone = copy.deepcopy(bn)
    assert type(clone) is bt.BatchNorm2d
    b2 = bt.BatchNorm2d(8).double()
    assert b2(torch.randn(2, 8, 3, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", ["1d-rank3", "2d", "3d"])
def test_state_dict_round_trips(kind, config):
    ours_cls, torch_cls, shape = CLASSES[kind]
    ref = torch_cls(shape[1], **CONFIGS[config])
    ref.train()
    for _ in range(3):
        ref(torch.randn(shape) * 3 + 2)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    # torch -> bnorm
    ours = ours_cls(shape[1], **CONFIGS[config])
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert ours.state_dict()._metadata[""]["version"] == ref.state_dict()._metadata[""]["version"]
    ours.eval()
    ref.eval()
    x = torch.randn(shape)
    close(ours(x), ref(x), torch.float32)
    # bnorm -> torch, after training ours further
    ours.train()
    ours(torch.randn(shape) - 1)
    back = torch_cls(shape[1], **CONFIGS[config])
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)


def test_old_state_dict_without_num_batches_tracked_loads_like_torch():
    ref = nn.BatchNorm2d(4)
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    ours = bt.BatchNorm2d(4)
    ours.load_state_dict(sd)
    ref.load_state_dict(sd)
    assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)


def test_strict_loading_reports_like_torch():
    ours = bt.BatchNorm2d(4, affine=False)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ours.load_state_dict(nn.BatchNorm2d(4).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        bt.BatchNorm2d(4).load_state_dict(nn.BatchNorm2d(5).state_dict())


def test_save_and_load_through_torch_save(tmp_path):
    ref = nn.BatchNorm2d(3)
    ref(torch.randn(4, 3, 2, 2))
    torch.save(ref.state_dict(), tmp_path / "bn.pt")
    ours = bt.BatchNorm2d(3)
    ours.load_state_dict(torch.load(tmp_path / "bn.pt"))
    assert torch.equal(ours.running_mean, ref.running_mean)


class _Block(nn.Module):
    """A torchvision-like basic residual block."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def _small_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _Block(8, 8, 1),
        _Block(8, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.BatchNorm1d(12, momentum=None),
        nn.ReLU(),
        nn.Linear(12, 5),
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_convert_small_resnet_gives_the_same_outputs(channels_last):
    torch.manual_seed(31)
    ref = _small_resnet()
    for m in ref.modules():  # non-trivial state
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model = bt.convert(copy.deepcopy(ref))
    n_ours = sum(type(m) in (bt.BatchNorm1d, bt.BatchNorm2d) for m in model.modules())
    assert n_ours == 7
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    assert list(model.state_dict()) == list(ref.state_dict())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(6, 3, 12, 12)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y, ry = model(x), ref(x)
        close(y, ry, torch.float32, grad=True)
        y.square().sum().backward()
        ry.square().sum().backward()
        for (n, p), rp in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, rp.grad, rtol=2e-3, atol=2e-3, msg=n)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=n)
    model.eval()
    ref.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 12, 12)
        close(model(x), ref(x), torch.float32, grad=True)


def test_convert_shares_state_and_keeps_optimizers_working():
    torch.manual_seed(32)
    model = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4), nn.Flatten(1), nn.BatchNorm1d(4 * 27))
    shared = nn.BatchNorm2d(3)
    holder = nn.ModuleDict({"a": shared, "b": shared, "seq": model})
    holder.eval()
    weight, buf = model[1].weight, model[1].running_mean
    opt = torch.optim.SGD(holder.parameters(), lr=0.1)
    out = bt.convert(holder)
    assert out is holder
    assert type(holder["seq"][1]) is bt.BatchNorm3d and type(holder["seq"][3]) is bt.BatchNorm1d
    assert holder["a"] is holder["b"] and type(holder["a"]) is bt.BatchNorm2d
    assert holder["seq"][1].weight is weight and holder["seq"][1].running_mean is buf
    assert not holder["seq"][1].training
    holder.train()
    # square(): the gradient of weight is sum(2 * y * xhat), far from 0 (with .sum() it is sum(xhat),
    # 0 up to rounding, and may be exactly 0).
    holder["seq"](torch.randn(2, 2, 3, 3, 3)).square().sum().backward()
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight, before)


def test_convert_a_batchnorm_itself_and_leave_others_alone():
    bn = nn.BatchNorm2d(4, momentum=None, eps=1e-3)
    bn.qconfig = "kept"
    new = bt.convert(bn)
    assert type(new) is bt.BatchNorm2d and new.momentum is None and new.eps == 1e-3 and new.qconfig == "kept"

    class Custom(nn.BatchNorm2d):
        pass

    custom, sync = Custom(4), nn.SyncBatchNorm(4)
    assert bt.convert(custom) is custom and bt.convert(sync) is sync
    ours = bt.BatchNorm2d(4)
    assert bt.convert(ours) is ours
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bt.convert("not a module")


def test_frozen_parameters_and_no_grad():
    bn = bt.BatchNorm2d(3)
    bn.requires_grad_(False)
    y = bn(torch.randn(2, 3, 4, 4))
    assert y.grad_fn is None
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    bn(x).sum().backward()
    assert x.grad is not None and bn.weight.grad is None
    assert int(bn.num_batches_tracked) == 2


def test_momentum_none_is_a_cumulative_average():
    bn = bt.BatchNorm1d(2, momentum=None)
    xs = [torch.randn(8, 2) * (i + 1) + i for i in range(4)]
    for x in xs:
        bn(x)
    means = torch.stack([x.mean(0) for x in xs]).mean(0)
    close(bn.running_mean, means, torch.float32)
    assert int(bn.num_batches_tracked) == 4


def test_numpy_helpers_module_level():
    # np arrays are not tensors: the modules refuse them with a TypeError
    with pytest.raises(TypeError, match="torch.Tensor"):
        bt.BatchNorm1d(3)(np.zeros((4, 3), np.float32))
