"""Ghost Batch Normalization and Batch Renormalization (bnorm.torch.GhostBatchNorm*d, BatchRenorm*d,
to_ghost, to_renorm; torch.ops.bnorm.ghost_batch_norm, batch_renorm): forward, input/weight/bias
gradients and running statistics over several steps against float64 torch compositions (Ghost BN:
torch's batch_norm applied to each virtual batch in turn; Batch Renorm: Algorithm 1 in torch ops with
r and d detached), both memory formats, float32 and bfloat16, eval; against Keras 3's
BatchNormalization(renorm=True) on the torch backend where its semantics match (docs/semantics.md);
opcheck of the operators; errors that change nothing."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import bnorm.torch as bt

ops = torch.ops.bnorm
FORMATS = [torch.contiguous_format, torch.channels_last]
FORMAT_IDS = ["contiguous", "channels_last"]
# float32 results against the float64 composition; bfloat16 ones (stored with 8 bits of mantissa)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}


def _data(shape, dtype, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if len(shape) == 4:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy


def _randomize(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g))
    return m


def _grads(module, x, dy):
    """Output, input/weight/bias gradients of module(x) for the upstream gradient dy, as float64."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    y = module(x)
    y.backward(dy)
    return [t.double() for t in (y.detach(), x.grad, module.weight.grad, module.bias.grad)]


class GhostReference(torch.nn.Module):
    """float64 torch: batch_norm on each virtual batch in turn (the issue's definition)."""

    def __init__(self, bn, vbs):
        super().__init__()
        self.vbs = vbs
        self.weight = torch.nn.Parameter(bn.weight.detach().double().clone())
        self.bias = torch.nn.Parameter(bn.bias.detach().double().clone())
        self.running_mean = bn.running_mean.detach().double().clone()
        self.running_var = bn.running_var.detach().double().clone()
        self.momentum, self.eps = bn.momentum, bn.eps

    def forward(self, x):
        x = x.double()
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return torch.cat([F.batch_norm(part, self.running_mean, self.running_var, self.weight, self.bias, True,
                                       self.momentum, self.eps) for part in x.split(self.vbs)])


class RenormReference(torch.nn.Module):
    """float64 torch: Ioffe 2017's Algorithm 1, r and d detached, torch's running update."""

    def __init__(self, bn):
        super().__init__()
        self.weight = torch.nn.Parameter(bn.weight.detach().double().clone())
        self.bias = torch.nn.Parameter(bn.bias.detach().double().clone())
        self.running_mean = bn.running_mean.detach().double().clone()
        self.running_var = bn.running_var.detach().double().clone()
        self.momentum, self.eps, self.r_max, self.d_max = bn.momentum, bn.eps, bn.r_max, bn.d_max

    def forward(self, x):
        x = x.double()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        mu, var = x.mean(dims), x.var(dims, unbiased=False)
        sigma_b = (var + self.eps).sqrt()
        sigma = (self.running_var + self.eps).sqrt()
        r = (sigma_b / sigma).clamp(1 / self.r_max, self.r_max).detach()
        d = ((mu - self.running_mean) / sigma).clamp(-self.d_max, self.d_max).detach()
        xhat = (x - mu.reshape(shape)) / sigma_b.reshape(shape)
        y = self.weight.reshape(shape) * (xhat * r.reshape(shape) + d.reshape(shape)) + self.bias.reshape(shape)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mu)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
        return y


def _compare_steps(ours, ref, shape, dtype, fmt, steps=3):
    tol = TOL[dtype]
    for step in range(steps):
        x, dy = _data(shape, dtype, fmt, seed=10 + step)
        got, want = _grads(ours, x, dy), _grads(ref, x.double(), dy.double())
        for name, g, w in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
            scale = w.abs().max().item()  # gradients are sums: their tolerance scales with them
            torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale),
                                       msg=lambda m: f"step {step} {name}: {m}")
        torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, **tol)
        torch.testing.assert_close(ours.running_var.double(), ref.running_var, **tol)
        if len(shape) == 4 and fmt == torch.channels_last:
            assert got[0].is_contiguous(memory_format=torch.channels_last)
    ours.eval(), ref.eval()
    x, _ = _data(shape, dtype, fmt, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), ref(x.double()), **tol)


# ---- Ghost BN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("vbs", [4, 3, 16], ids=["vbs4", "vbs3", "vbs16"])
def test_ghost_matches_batch_norm_per_virtual_batch(fmt, dtype, vbs):
    ours = _randomize(bt.GhostBatchNorm2d(5, vbs)).to(dtype)
    ref = GhostReference(ours, vbs)
    _compare_steps(ours, ref, (10, 5, 4, 3), dtype, fmt)
    assert ours.num_batches_tracked.item() == 3 * -(-10 // vbs)  # one per virtual batch, as the composition


@pytest.mark.parametrize("cls,shape", [(bt.GhostBatchNorm1d, (9, 4)), (bt.GhostBatchNorm1d, (9, 4, 5)),
                                       (bt.GhostBatchNorm3d, (7, 3, 2, 3, 2))], ids=["1d-2", "1d-3", "3d"])
def test_ghost_other_ranks(cls, shape):
    ours = _randomize(cls(shape[1], 2 if len(shape) > 2 else 3))
    _compare_steps(ours, GhostReference(ours, ours.virtual_batch_size), shape, torch.float32,
                   torch.contiguous_format)


def test_ghost_without_running_stats_normalizes_per_virtual_batch_in_eval_too():
    ours = _randomize(bt.GhostBatchNorm2d(3, 2, track_running_stats=False)).eval()
    x, _ = _data((6, 3, 2, 2), torch.float32, torch.contiguous_format, 1)
    want = torch.cat([F.batch_norm(p.double(), None, None, ours.weight.double(), ours.bias.double(), True)
                      for p in x.split(2)])
    torch.testing.assert_close(ours(x).double(), want.detach(), **TOL[torch.float32])


# ---- Batch Renorm ------------------------------------------------------------------------------


def _renorm(cls, C, r_max, d_max, dtype=torch.float32):
    m = _randomize(cls(C, r_max=r_max, d_max=d_max)).to(dtype)
    with torch.no_grad():  # running statistics away from the batches', so that r and d clip
        m.running_mean.copy_(torch.linspace(-2, 2, C))
        m.running_var.copy_(torch.linspace(0.05, 12, C))
    return m


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("limits", [(1.5, 0.5), (3.0, 5.0), (1.0, 0.0)], ids=["clipping", "wide", "bn"])
def test_renorm_matches_algorithm_1(fmt, dtype, limits):
    ours = _renorm(bt.BatchRenorm2d, 5, *limits, dtype=dtype)
    _compare_steps(ours, RenormReference(ours), (8, 5, 4, 3), dtype, fmt)
    assert ours.num_batches_tracked.item() == 3


def test_renorm_limits_change_between_steps_and_other_ranks():
    for cls, shape in [(bt.BatchRenorm1d, (12, 4)), (bt.BatchRenorm1d, (6, 4, 5)), (bt.BatchRenorm3d, (4, 4, 2, 3, 2))]:
        ours = _renorm(cls, 4, 1.0, 0.0)
        ref = RenormReference(ours)
        for r_max, d_max in [(1.0, 0.0), (1.25, 0.25), (2.0, 1.0)]:  # the paper's warm-up
            ours.r_max = ref.r_max = r_max
            ours.d_max = ref.d_max = d_max
            _compare_steps(ours, ref, shape, torch.float32, torch.contiguous_format, steps=1)
            ours.train(), ref.train()


def test_renorm_with_limits_1_and_0_is_batch_norm():
    ours = _renorm(bt.BatchRenorm2d, 3, 1.0, 0.0)
    bn = copy.deepcopy(ours)
    bn.__class__ = torch.nn.BatchNorm2d
    x, dy = _data((4, 3, 5, 5), torch.float32, torch.contiguous_format, 2)
    for g, w in zip(_grads(ours, x, dy), _grads(bn, x, dy)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, bn.running_var)


# ---- against Keras 3 (torch backend) ------------------------------------------------------------


def test_renorm_agrees_with_keras_where_semantics_match():
    """Keras's r and d come from its renorm_mean / renorm_stddev (their own moving averages, with
    renorm_momentum); ours from the running statistics. Set ours to Keras's before each step (running_var
    = renorm_stddev^2 - eps): then output and gradients agree. The running updates differ (documented)."""
    import subprocess
    import sys

    code = r"""
import os, torch, numpy as np
os.environ["KERAS_BACKEND"] = "torch"
import keras
import bnorm.torch as bt
torch.manual_seed(0)
C, eps, r_max, d_max = 4, 1e-3, 1.5, 0.5
layer = keras.layers.BatchNormalization(axis=1, epsilon=eps, momentum=0.9, renorm=True, renorm_momentum=0.5,
                                        renorm_clipping={"rmax": r_max, "rmin": 1 / r_max, "dmax": d_max})
layer.build((8, C, 3, 3))
ours = bt.BatchRenorm2d(C, r_max=r_max, d_max=d_max, eps=eps, momentum=0.1).double()
worst = 0.0
for step, (scale, shift) in enumerate([(3.0, 2.0), (0.1, -1.0), (1.0, 0.0)]):  # r and d clip both ways
    x = torch.randn(8, C, 3, 3, dtype=torch.float64) * scale + shift
    dy = torch.randn_like(x)
    with torch.no_grad():
        ours.running_mean.copy_(torch.as_tensor(np.asarray(layer.renorm_mean.numpy()), dtype=torch.float64))
        sd = torch.as_tensor(np.asarray(layer.renorm_stddev.numpy()), dtype=torch.float64)
        ours.running_var.copy_(sd * sd - eps)
    xk = x.float().clone().requires_grad_()
    yk = layer(xk, training=True)
    yk.backward(dy.float())
    xo = x.float().clone().requires_grad_()
    o32 = bt.BatchRenorm2d(C, r_max=r_max, d_max=d_max, eps=eps)
    o32.load_state_dict(ours.state_dict())
    yo = o32(xo)
    yo.backward(dy.float())
    gk = [p.value.grad for p in (layer.gamma, layer.beta)]
    for a, b in [(yo, yk), (xo.grad, xk.grad), (o32.weight.grad, gk[0]), (o32.bias.grad, gk[1])]:
        worst = max(worst, ((a.double() - b.double()).abs() / (1 + b.double().abs())).max().item())
    for p in (layer.gamma, layer.beta):
        p.value.grad = None
print("WORST", worst)
"""
    env = dict(os.environ, KERAS_BACKEND="torch")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    worst = float(run.stdout.split("WORST")[1])
    assert worst < 1e-4, run.stdout  # float32 on both sides; a missing clip gives > 1


# ---- conversion ----------------------------------------------------------------------------------


def _model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6))


def test_to_ghost_and_to_renorm_share_state_and_keep_state_dict():
    model = _model()
    keys = list(model.state_dict())
    bn_weight = model[1].weight
    ghost = bt.to_ghost(model, 4)
    assert type(ghost[1]) is bt.GhostBatchNorm2d and type(ghost[5]) is bt.GhostBatchNorm1d
    assert ghost[1].virtual_batch_size == 4 and ghost[1].weight is bn_weight
    assert list(ghost.state_dict()) == keys
    renorm = bt.to_renorm(ghost, r_max=2.0, d_max=1.0)
    assert type(renorm[1]) is bt.BatchRenorm2d and renorm[1].r_max == 2.0 and renorm[5].d_max == 1.0
    assert renorm[1].weight is bn_weight and list(renorm.state_dict()) == keys
    assert not hasattr(renorm[1], "virtual_batch_size")
    renorm(torch.randn(8, 3, 6, 6)).sum().backward()
    assert bn_weight.grad is not None
    # A torch BatchNorm's state_dict loads into the variants and back.
    torch.nn.BatchNorm2d(4).load_state_dict(renorm[1].state_dict())


def test_convert_takes_the_variants_as_options():
    ghost = bt.convert(_model(), virtual_batch_size=3)
    assert type(ghost[1]) is bt.GhostBatchNorm2d and ghost[1].virtual_batch_size == 3
    renorm = bt.convert(_model(), renorm=(2.0, 1.5))
    assert type(renorm[1]) is bt.BatchRenorm2d and (renorm[1].r_max, renorm[1].d_max) == (2.0, 1.5)
    assert (bt.convert(_model(), renorm=True)[1].r_max, bt.convert(_model(), renorm=True)[1].d_max) == (3.0, 5.0)
    x, base = torch.randn(8, 3, 6, 6), _model()
    ref = bt.to_ghost(copy.deepcopy(base), 3)
    torch.testing.assert_close(bt.convert(base, virtual_batch_size=3)(x), ref(x))
    model = _model()
    for kwargs, names in (({"virtual_batch_size": 2, "renorm": True}, "virtual_batch_size, renorm"),
                          ({"fuse": True, "virtual_batch_size": 2}, "fuse, virtual_batch_size")):
        with pytest.raises(ValueError, match=f"expected at most one of fuse, virtual_batch_size and renorm, got {names}"):
            bt.convert(model, **kwargs)
        assert type(model[1]) is torch.nn.BatchNorm2d
    with pytest.raises(ValueError, match=r"renorm: expected \(r_max, d_max\) or True, got 2.0"):
        bt.convert(model, renorm=2.0)


def test_conversion_refusals_change_nothing():
    model = _model()
    model[5] = torch.nn.BatchNorm1d(6, track_running_stats=False)
    with pytest.raises(ValueError, match=r"bnorm.torch.to_renorm: 5: track_running_stats: expected True"):
        bt.to_renorm(model)
    assert type(model[1]) is torch.nn.BatchNorm2d
    model[5] = torch.nn.BatchNorm1d(6, momentum=None)
    with pytest.raises(ValueError, match=r"bnorm.torch.to_ghost: 5: momentum: expected a float in \[0, 1\]"):
        bt.to_ghost(model, 2)
    assert type(model[1]) is torch.nn.BatchNorm2d
    with pytest.raises(ValueError, match=r"virtual_batch_size: expected an int >= 1, got 0"):
        bt.to_ghost(model, 0)


# ---- errors and operators ----------------------------------------------------------------------


def test_errors_name_the_argument_and_change_nothing():
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d: virtual_batch_size: expected an int >= 1, got 0"):
        bt.GhostBatchNorm2d(3, 0)
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d: momentum: expected a float in \[0, 1\], got None"):
        bt.GhostBatchNorm2d(3, 2, momentum=None)
    with pytest.raises(ValueError, match=r"BatchRenorm2d: track_running_stats: expected True"):
        bt.BatchRenorm2d(3, track_running_stats=False)
    m = bt.BatchRenorm2d(3, r_max=0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"bnorm::batch_renorm: r_max: expected a value >= 1 \(inf: r unclipped\), "
                                         r"got 0.5"):
        m(torch.randn(4, 3, 2, 2))
    m.r_max, m.d_max = 2.0, -1.0
    with pytest.raises(ValueError, match=r"bnorm::batch_renorm: d_max: expected a value >= 0"):
        m(torch.randn(4, 3, 2, 2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    g = bt.GhostBatchNorm1d(3, 2)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    with pytest.raises(ValueError, match=r"bnorm::ghost_batch_norm: input: expected more than 1 value per channel in "
                                         r"every virtual batch when training, got 1 in the last one"):
        g(torch.randn(5, 3))
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TypeError, match=r"bnorm::ghost_batch_norm: input: expected float32, float64, bfloat16"):
        ops.ghost_batch_norm(torch.ones(4, 3, dtype=torch.int32), None, None, None, None, 2, True, 0.1, 1e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_opcheck(fmt):
    x, _ = _data((6, 3, 4, 4), torch.float32, fmt, 0)
    w, b = torch.rand(3).add(0.5), torch.randn(3)
    rm, rv = torch.randn(3) * 0.1, torch.rand(3).add(0.5)
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    fwd = ops.ghost_batch_norm_forward(x, w, b, rm, rv, 4, 0.1, 1e-5)
    assert fwd[1].shape == (2 * 3,) and fwd[1].dtype == torch.float64
    rfwd = ops.batch_renorm_forward(x, w, b, rm, rv, 2.0, 1.0, 0.1, 1e-5)
    cases = [
        (ops.ghost_batch_norm, (xg, wg, bg, rm.clone(), rv.clone(), 4, True, 0.1, 1e-5)),
        (ops.ghost_batch_norm, (xg, wg, bg, rm.clone(), rv.clone(), 4, False, 0.1, 1e-5)),
        (ops.ghost_batch_norm_forward, (x, w, b, rm, rv, 4, 0.1, 1e-5)),
        (ops.ghost_batch_norm_backward, (torch.randn_like(x), x, w, fwd[1], fwd[2], 4)),
        (ops.batch_renorm, (xg, wg, bg, rm.clone(), rv.clone(), True, 2.0, 1.0, 0.1, 1e-5)),
        (ops.batch_renorm_forward, (x, w, b, rm, rv, 2.0, 1.0, 0.1, 1e-5)),
        (ops.batch_renorm_backward, (torch.randn_like(x), x, w, rfwd[1], rfwd[2], rfwd[3], rfwd[4])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)  # schema, autograd registration, FakeTensor, AOT dispatch (dynamic)


def test_compile_fullgraph_matches_eager():
    ours = _randomize(bt.GhostBatchNorm2d(3, 2))
    ren = _renorm(bt.BatchRenorm2d, 3, 1.5, 0.5)
    model = torch.nn.Sequential(ours, ren)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, dy = _data((6, 3, 4, 4), torch.float32, torch.channels_last, 4)
    got, want = _grads_seq(compiled, model, x, dy), _grads_seq(eager, eager, x, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


def _grads_seq(run, model, x, dy):
    x = x.detach().clone().requires_grad_()
    y = run(x)
    y.backward(dy)
    return [y.detach(), x.grad, model[0].weight.grad, model[1].bias.grad]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_in_eval_is_batchnormalization(dynamo, tmp_path):
    import warnings

    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(_randomize(bt.GhostBatchNorm2d(3, 2)), _renorm(bt.BatchRenorm2d, 3, 2.0, 1.0)).eval()
    x, _ = _data((4, 3, 5, 5), torch.float32, torch.contiguous_format, 7)
    path = str(tmp_path / "variants.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, input_names=["x"])
    kinds = [n.op_type for n in onnx.load(path).graph.node]
    assert not any("bnorm" in k for k in kinds), kinds
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2, _ = _data((4, 3, 5, 5), torch.float32, torch.contiguous_format, 8)
    (got,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x2), rtol=1e-5, atol=1e-5)
