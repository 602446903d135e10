"""bnorm._fuse.fuse: BatchNorm -> ReLU and BatchNorm -> add -> ReLU fused, against the unfused converted model."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnorm.torch as bt
from _helpers import GRAD_TOL, TOL
from bnorm._fuse import BatchNormAddReLU, BatchNormReLU, fuse
from bnorm._modules import BnormForward

torchvision = pytest.importorskip("torchvision")


def _fused_modules(model):
    return [m for m in model.modules() if isinstance(m, (BatchNormReLU, BatchNormAddReLU))]


def _counts(report):
    return sum(": fused " in line for line in report), sum(": not fused: " in line for line in report)


def _layout(t, layout):
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" and t.dim() == 4 else t


def _near(actual, expected, dtype, grad=False):
    """close() with the absolute tolerance scaled by the tensor's largest value: through tens of layers,
    the kernels' rounding differences grow with the values' magnitude, not with each element's."""
    assert (actual is None) == (expected is None)
    if expected is not None:
        scale = max(expected.detach().abs().max().item(), 1.0)
        tol = (GRAD_TOL if grad else TOL)[dtype]
        torch.testing.assert_close(actual.detach(), expected.detach(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def _layout_format(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _check_same(unfused, fused, inputs, dtype, steps=1):
    """Training steps (one SGD step after each) then eval: outputs, input and parameter gradients, and
    all of the state (running statistics, num_batches_tracked, parameters) agree."""
    names = [name for name, _ in unfused.named_parameters()]
    assert [name for name, _ in fused.named_parameters()] == names
    opt = torch.optim.SGD(unfused.parameters(), lr=0.05)
    fused_opt = torch.optim.SGD(fused.parameters(), lr=0.05)
    for step in range(steps + 1):
        training = step < steps
        unfused.train(training)
        fused.train(training)
        xs = [x.clone().requires_grad_() for x in inputs(step)]
        fxs = [x.detach().clone().requires_grad_() for x in xs]
        torch.manual_seed(100 + step)  # the same dropout masks
        y = unfused(*xs)
        torch.manual_seed(100 + step)
        fy = fused(*fxs)
        _near(fy, y, dtype)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (fy * g).sum().backward()
        for x, fx in zip(xs, fxs):
            _near(fx.grad, x.grad, dtype, grad=True)
        for name, p, fp in zip(names, unfused.parameters(), fused.parameters()):
            _near(fp.grad, p.grad, dtype, grad=True)
        if training:
            opt.step()
            fused_opt.step()
        opt.zero_grad()
        fused_opt.zero_grad()
        state, fused_state = unfused.state_dict(), fused.state_dict()
        assert list(fused_state) == list(state)
        for key, value in state.items():
            if value.dtype == torch.int64:
                assert torch.equal(fused_state[key], value), key
            else:
                _near(fused_state[key], value, dtype)


def _torchvision(name, dtype, convert=True):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        model(torch.randn(2, 3, 32, 32, dtype=dtype))
    return bt.convert(model) if convert else model


# Fused sites: the stem's bn1 -> relu, and in each block every bn -> relu and the last bn -> add -> relu.
# Not fused: each downsample's BatchNorm (the residual of the block's add); mobilenet_v2's ReLU6.
TORCHVISION = {"resnet18": (9, 8, 3), "resnet50": (33, 16, 4), "mobilenet_v2": (0, 0, 52)}

CASES = [pytest.param(name, layout, id=f"{name}-{layout}") for name in TORCHVISION
         for layout in ("contiguous", "channels_last")]


@pytest.mark.parametrize("name, layout", CASES)
def test_torchvision_models_match_the_unfused_model(name, layout):
    dtype = torch.float64  # the fused operators against the unfused ones: agreement to ~1e-12
    relu_sites, add_sites, unfused_sites = TORCHVISION[name]
    base = _torchvision(name, dtype, convert=False).to(memory_format=_layout_format(layout))
    model = bt.convert(copy.deepcopy(base))
    reference = copy.deepcopy(model)
    fused, report = fuse(model)
    kinds = [type(m) for m in _fused_modules(fused)]
    assert (kinds.count(BatchNormReLU), kinds.count(BatchNormAddReLU)) == (relu_sites, add_sites)
    assert _counts(report) == (relu_sites + add_sites, unfused_sites)
    if relu_sites + add_sites == 0:
        assert fused is model  # nothing fused: the model as it was, not a GraphModule
    torch.manual_seed(1)
    batches = [_layout(torch.randn(2, 3, 64, 64, dtype=dtype), layout) for _ in range(3)]
    _check_same(reference, fused, lambda step: [batches[step]], dtype)


def test_resnet18_report_and_calls():
    model = _torchvision("resnet18", torch.float32)
    fused, report = fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert len(report) == 20  # one line per BatchNorm call
    assert "bn1: fused bn -> relu (ReLU) as bn1_relu (BatchNormReLU)" in report
    assert ("layer2.0.bn2: fused bn -> += -> layer2.0.relu (ReLU) as layer2.0.bn2_add_relu "
            "(BatchNormAddReLU)") in report
    assert "layer2.0.downsample.1: not fused: its output is the residual of the fused layer2.0.bn2" in report
    # The BatchNorms stay where they were; the fused modules sit beside them.
    assert fused.get_submodule("layer1.0.bn2") is model.get_submodule("layer1.0.bn2")
    assert isinstance(fused.get_submodule("layer1.0.bn2_add_relu"), BatchNormAddReLU)
    assert list(fused.get_submodule("layer1.0")._modules)[:6] == [
        "conv1", "bn1", "bn1_relu", "relu", "conv2", "bn2"]

    # Per forward: 17 fused calls (8 with a residual), and the 3 downsample BatchNorms called as modules.
    calls, module_calls = [], []
    bnorm_call = BnormForward._bnorm_call

    def spy(self, input, residual=None, relu=False):
        calls.append((residual is not None, relu))
        return bnorm_call(self, input, residual=residual, relu=relu)

    for m in fused.modules():
        if isinstance(m, BnormForward):
            m.register_forward_hook(lambda *_: module_calls.append(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BnormForward, "_bnorm_call", spy)
        fused(torch.randn(2, 3, 64, 64))
    # forward() is _bnorm_call(input) too: the 3 downsample BatchNorms are the unfused calls.
    assert sorted(calls) == [(False, False)] * 3 + [(False, True)] * 9 + [(True, True)] * 8
    assert len(module_calls) == 3


def test_state_dict_keys_parameters_and_flags_are_kept():
    model = _torchvision("resnet18", torch.float32).eval()
    model.layer1[0].train()  # a mixed state: every module keeps its own flag
    before = {name: m.training for name, m in model.named_modules()}
    fused, _ = fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [(n, id(p)) for n, p in fused.named_parameters()] == [(n, id(p)) for n, p in model.named_parameters()]
    assert [(n, id(b)) for n, b in fused.named_buffers()] == [(n, id(b)) for n, b in model.named_buffers()]
    assert {name: m.training for name, m in fused.named_modules() if name in before} == before
    fused.load_state_dict(_torchvision("resnet18", torch.float32).state_dict())  # strict: same keys


def test_unused_and_non_persistent_state_is_kept():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.bn = nn.BatchNorm2d(3)
            self.inner.register_buffer("scale", torch.tensor(2.0), persistent=False)
            self.inner.register_buffer("unused_buffer", torch.ones(2))
            self.unused = nn.Linear(2, 2)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.inner.bn(x)) * self.inner.scale

    model = bt.convert(Net())
    fused, report = fuse(model)
    assert _counts(report) == (1, 0)
    assert list(fused.state_dict()) == list(model.state_dict())  # unused ones kept, scale not persistent
    assert fused.unused is model.unused
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in model.named_buffers()]


class Net(nn.Module):
    """A BatchNorm and whatever fn does with it: fn(self, x, t)."""

    def __init__(self, fn):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(self, x, t)


def _add_in_place(m, x, t):
    out = m.bn(x)
    out += t
    return m.relu_inplace(out)


def _int_augmented(m, x, t):
    n = x.size(0)
    k = n
    k += 1  # a new int: n keeps its value (torch.fx's `n += 1` code generation would rebind n)
    return m.relu(m.bn(x)) * n + k


FUSED = {
    "nn.ReLU": lambda m, x, t: m.relu(m.bn(x)),
    "nn.ReLU(inplace=True)": lambda m, x, t: m.relu_inplace(m.bn(x)),
    "torch.relu": lambda m, x, t: torch.relu(m.bn(x)),
    "torch.relu_": lambda m, x, t: torch.relu_(m.bn(x)),
    "F.relu": lambda m, x, t: F.relu(m.bn(x)),
    "F.relu(inplace=True)": lambda m, x, t: F.relu(m.bn(x), inplace=True),
    "F.relu(x, True)": lambda m, x, t: F.relu(m.bn(x), True),
    "F.relu_": lambda m, x, t: F.relu_(m.bn(x)),
    "Tensor.relu": lambda m, x, t: m.bn(x).relu(),
    "Tensor.relu_": lambda m, x, t: m.bn(x).relu_(),
    "bn + t": lambda m, x, t: m.relu(m.bn(x) + t),
    "t + bn": lambda m, x, t: m.relu_inplace(t + m.bn(x)),
    "bn += t": _add_in_place,
    "torch.add(bn, t)": lambda m, x, t: torch.relu(torch.add(m.bn(x), t)),
    "torch.add(t, bn)": lambda m, x, t: F.relu(torch.add(t, m.bn(x))),
    "bn.add(t)": lambda m, x, t: m.bn(x).add(t).relu(),
    "t.add(bn)": lambda m, x, t: t.add(m.bn(x)).relu_(),
    "bn.add_(t)": lambda m, x, t: m.bn(x).add_(t).relu_(),
    "relu, then an int's augmented assignment": _int_augmented,
}


def _inputs(step):
    torch.manual_seed(10 + step)
    return [torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2 + 1, torch.randn(2, 3, 4, 5, dtype=torch.float64)]


@pytest.mark.parametrize("case", FUSED)
def test_patterns_are_fused(case):
    model = bt.convert(Net(FUSED[case])).double()
    unfused = copy.deepcopy(model)
    fused, report = fuse(model)
    expected = BatchNormAddReLU if "add" in case or "+" in case else BatchNormReLU
    assert [type(m) for m in _fused_modules(fused)] == [expected], report
    assert len(report) == 1 and report[0].startswith("bn: fused bn -> ")
    _check_same(unfused, fused, _inputs, torch.float64)
    # Copies and pickles (GraphModule's pickling imports the functions its code calls) compute the same.
    x, t = _inputs(5)
    with torch.no_grad():
        expected = fused(x, t)
        for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            torch.testing.assert_close(copied(x, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (6, 3)), (nn.BatchNorm1d, (4, 3, 5)),
                                        (nn.BatchNorm3d, (2, 3, 2, 3, 4))], ids=["1d-rank2", "1d-rank3", "3d"])
def test_batchnorm1d_and_3d_are_fused(cls, shape):
    model = Net(FUSED["bn += t"])
    model.bn = cls(3)
    model = bt.convert(model).double()
    unfused = copy.deepcopy(model)
    fused, report = fuse(model)
    assert [type(m) for m in _fused_modules(fused)] == [BatchNormAddReLU], report

    def inputs(step):
        torch.manual_seed(step)
        return [torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)]

    _check_same(unfused, fused, inputs, torch.float64)


def _used_twice(m, x, t):
    y = m.bn(x)
    return m.relu(y) + y


def _also_returned(m, x, t):
    y = m.bn(x)
    return m.relu(y), y


def _sum_used_twice(m, x, t):
    s = m.bn(x) + t
    return m.relu(s) + s


def _residual_modified(m, x, t):
    u = t * 2
    v = u
    v += m.bn(x)  # eager adds into u's tensor, which is used below: a fused call would leave it as it was
    return m.relu(v) * u


def _input_modified_between(m, x, t):
    h = x * 1
    y = m.bn(h)
    h.mul_(2)  # after the BatchNorm read h: moving the BatchNorm to the ReLU would read the new value
    return m.relu(y) + h


def _called_again_between(m, x, t):
    y = m.bn(x)
    z = m.bn(t)  # updates the running statistics between the first call and its ReLU
    return m.relu(y) + z


NOT_FUSED = {
    "output used twice": (_used_twice, "its output is used by 2 nodes"),
    "output also returned": (_also_returned, "its output is used by 2 nodes"),
    "output only returned": (lambda m, x, t: m.bn(x), "it is followed by the output, not by ReLU"),
    "ReLU6": (lambda m, x, t: m.relu6(m.bn(x)), "it is followed by relu6 (ReLU6), not by ReLU"),
    "add of three": (lambda m, x, t: m.relu(m.bn(x) + t + t), "operator.add is followed by operator.add"),
    "sum used twice": (_sum_used_twice, "the output of operator.add is used by 2 nodes"),
    "alpha": (lambda m, x, t: torch.relu(torch.add(m.bn(x), t, alpha=2)), "other arguments than two operands"),
    "added to itself": (lambda m, x, t: m.relu((y := m.bn(x)) + y), "it is added to itself"),
    "residual modified in place": (_residual_modified, "adds it into the other operand in place"),
    "in place in between": (_input_modified_between, ".mul_(), between it and the ReLU, may modify"),
    "same BatchNorm in between": (_called_again_between, "uses the same BatchNorm's module state"),
    "added to a size": (lambda m, x, t: m.relu(m.bn(x) + x.size(0)), "something that is not a tensor"),
}


@pytest.mark.parametrize("case", NOT_FUSED)
def test_non_fusable_sites_are_reported_and_left(case):
    fn, why = NOT_FUSED[case]
    model = bt.convert(Net(fn)).double()
    unfused = copy.deepcopy(model)
    fused, report = fuse(model)
    assert fused is model and not _fused_modules(fused)
    assert report and all(": not fused: " in line for line in report), report
    assert any(why in line for line in report), report
    for step in range(2):
        model.train(step == 0)
        unfused.train(step == 0)
        with torch.no_grad():
            x, t = _inputs(step)
            torch.testing.assert_close(fused(x.clone(), t.clone()), unfused(x.clone(), t.clone()))


def test_hooks_and_torch_batchnorm_are_not_fused():
    model = bt.convert(Net(FUSED["bn + t"]))
    model.bn.register_forward_hook(lambda *_: None)
    fused, report = fuse(model)
    assert fused is model and report == ["bn: not fused: the BatchNorm has hooks, which the fused call would not run"]
    model = Net(FUSED["bn + t"])  # torch's BatchNorm2d, not converted
    assert fuse(model) == (model, [])


def _basic_block(inplanes, planes, stride=1):
    from torchvision.models.resnet import BasicBlock

    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride, downsample)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.block1 = _basic_block(8, 8)
        self.block2 = _basic_block(8, 16, stride=2)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = self.block1(x)
        return self.block2(x)


def test_untraceable_model_warns_and_fuses_its_children():
    model = bt.convert(Untraceable()).double()
    unfused = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, report = fuse(model)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(
        "bnorm fuse: the model (Untraceable) is left unfused: torch.fx cannot trace it "
        "(TraceError: symbolically traced variables cannot be used as inputs to control flow)")
    assert fused is model and isinstance(model.block1, torch.fx.GraphModule)
    assert _counts(report) == (4, 2)
    assert "block2.downsample.1: not fused: its output is the residual of the fused block2.bn2" in report
    assert "bn: not fused: it is called by the model (Untraceable), which is left unfused (see the warning)" in report
    _check_same(unfused, fused, lambda step: [torch.randn(2, 3, 8, 8, dtype=torch.float64)], torch.float64)


def test_fused_graphs_lint_clean_copy_and_fuse_again():
    model = _torchvision("resnet18", torch.float32)
    fused, _ = fuse(model)
    for m in fused.modules():
        if isinstance(m, torch.fx.GraphModule):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                m.graph.lint()
    x = torch.randn(2, 3, 64, 64)
    fused.eval()
    with torch.no_grad():
        expected = fused(x)
        torch.testing.assert_close(copy.deepcopy(fused)(x), expected, rtol=0, atol=0)
        again, report = fuse(fused)
        assert again is fused
        assert sum(": already fused as " in line for line in report) == 17
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_fuse_rejects_non_modules():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        fuse(lambda x: x)
