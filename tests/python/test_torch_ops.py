"""bnorm's torch operators (torch.ops.bnorm.*) and the modules over them, with the whole torch stack:
opcheck, float16, the meta device, torch.compile(fullgraph=True), torch.export, ONNX (both exporters,
run in onnxruntime on inputs other than the traced one), jit.trace, functional_call, vmap,
deepcopy, pickle, double backward, and errors that change nothing. Each compares numbers with eager
torch (or eager bnorm, where the claim is "the same as eager"), not merely that the call runs."""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import bnorm
import bnorm.torch as bt
from _dist import run_ranks

ops = torch.ops.bnorm
FORMATS = [torch.contiguous_format, torch.channels_last]
FORMAT_IDS = ["contiguous", "channels_last"]


def _x(shape=(4, 3, 5, 6), fmt=torch.contiguous_format, dtype=torch.float32, seed=0, scale=2.0, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).contiguous(
        memory_format=fmt)


def _vectors(C, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rv = torch.rand(C, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    return w, b, rm, rv


# ---- the operators themselves ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_every_operator(fmt, training):
    x = _x(fmt=fmt).requires_grad_()
    w, b, rm, rv = _vectors(3)
    w.requires_grad_(), b.requires_grad_()
    res = _x(fmt=fmt, seed=5)
    cases = [
        (ops.batch_norm, (x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5)),
        (ops.batch_norm, (x, None, None, None if training else rm.clone(), None if training else rv.clone(), training,
                          0.1, 1e-5)),
        (ops.batch_norm_relu, (x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5)),
        # the non-finite guard's counter (nonfinite_skips), a third mutated argument
        (ops.batch_norm, (x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, torch.zeros((), dtype=torch.int64))),
        (ops.batch_norm_add_relu, (x, res, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5)),
        (ops.batch_norm_forward, (x.detach(), w.detach(), b.detach(), rm.clone(), rv.clone(), None, training, 0.1,
                                  1e-5, False)),
    ]
    cases.append((ops.batch_norm_eval, (x.detach(), w.detach(), b.detach(), rm.clone(), rv.clone(), res, 1e-5, True)))
    out, sa, sb, new_rm, new_rv, skipped = ops.batch_norm_forward(x.detach(), w.detach(), b.detach(), rm.clone(),
                                                                  rv.clone(), None, training, 0.1, 1e-5, False)
    assert skipped.dtype == torch.int64 and skipped.dim() == 0 and int(skipped) == 0
    if training:  # the updated statistics as new tensors; the arguments are not changed
        torch.testing.assert_close(new_rm, 0.9 * rm + 0.1 * x.detach().mean(dim=(0, 2, 3)))
    else:
        assert new_rm.numel() == 0 and new_rv.numel() == 0
    if not training:  # eval's backward reads the running statistics (its forward returns no statistics)
        assert sa.numel() == 0 and sb.numel() == 0
        sa, sb = rm, rv
    cases.append((ops.batch_norm_backward, (torch.randn_like(out), x.detach(), w.detach(), sa, sb, None, training,
                                            1e-5, False)))
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", ["none", "relu", "add_relu"])
def test_operators_match_torch(fmt, training, fused):
    x = _x(fmt=fmt, dtype=torch.float64).requires_grad_()
    res = _x(fmt=fmt, dtype=torch.float64, seed=3).requires_grad_()
    w, b, rm, rv = (v.requires_grad_() if i < 2 else v for i, v in enumerate(_vectors(3, torch.float64)))
    tx, tres, tw, tb = (t.detach().clone().requires_grad_() for t in (x, res, w, b))
    trm, trv = rm.clone(), rv.clone()
    args = (w, b, rm, rv, training, 0.1, 1e-5)
    y = {"none": lambda: ops.batch_norm(x, *args), "relu": lambda: ops.batch_norm_relu(x, *args),
         "add_relu": lambda: ops.batch_norm_add_relu(x, res, *args)}[fused]()
    t = F.batch_norm(tx, trm, trv, tw, tb, training, 0.1, 1e-5)
    if fused == "add_relu":
        t = t + tres
    if fused != "none":
        t = torch.relu(t)
    assert y.stride() == t.stride()
    torch.testing.assert_close(y, t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, trm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, trv, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(t)
    wanted = (x, w, b, res) if fused == "add_relu" else (x, w, b)
    twanted = (tx, tw, tb, tres) if fused == "add_relu" else (tx, tw, tb)
    for a, e in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(t, twanted, g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_outputs_are_not_views_and_in_place_ops_after_bn_work():
    # The bug of the Python autograd.Function: in channels_last its output was a view, and
    # ReLU(inplace=True) or `out += identity` after BN raised in training.
    for fmt in FORMATS:
        x = _x(fmt=fmt).requires_grad_()
        tx = x.detach().clone().requires_grad_()
        bn, tbn = bt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
        identity = _x(fmt=fmt, seed=2)
        y = bn(x)
        assert y._base is None
        y += identity
        y = torch.relu_(y)
        t = torch.relu_(tbn(tx) + identity)
        torch.testing.assert_close(y, t)
        y.sum().backward()
        t.sum().backward()
        torch.testing.assert_close(x.grad, tx.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_float16_like_torch(fmt):
    for training in (True, False):
        bn, tbn = bt.BatchNorm2d(3).half(), torch.nn.BatchNorm2d(3).half()
        bn.train(training), tbn.train(training)
        x = _x(fmt=fmt, dtype=torch.float16).requires_grad_()
        tx = x.detach().clone().requires_grad_()
        y, t = bn(x), tbn(tx)
        assert y.dtype == torch.float16 and y.stride() == t.stride()
        torch.testing.assert_close(y, t, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(bn.running_var, tbn.running_var, rtol=2e-3, atol=2e-3)
        g = torch.randn_like(y)
        y.backward(g), t.backward(g)
        torch.testing.assert_close(x.grad, tx.grad, rtol=5e-3, atol=5e-3)
        torch.testing.assert_close(bn.weight.grad, tbn.weight.grad, rtol=5e-3, atol=5e-2)
        assert bn.weight.grad.dtype == torch.float16


def test_meta_device_gives_the_cpu_kernel_shapes_strides_and_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for fmt in FORMATS:
            for training in (True, False):
                x = _x(fmt=fmt, dtype=dtype)
                vectors = _vectors(3, torch.float32)
                cpu = ops.batch_norm_forward(x, *vectors, None, training, 0.1, 1e-5, True)
                meta = ops.batch_norm_forward(x.to("meta"), *(v.to("meta") for v in vectors), None, training, 0.1,
                                              1e-5, True)
                for c, m in zip(cpu, meta):
                    assert m.device.type == "meta"
                    assert (m.shape, m.stride(), m.dtype) == (c.shape, c.stride(), c.dtype)
    bn = bt.BatchNorm2d(8, device="meta")
    y = bn(torch.empty(2, 8, 4, 4, device="meta").contiguous(memory_format=torch.channels_last))
    assert y.device.type == "meta" and y.is_contiguous(memory_format=torch.channels_last)


def test_double_backward_is_a_clear_error():
    x = _x().requires_grad_()
    bn = bt.BatchNorm2d(3)
    y = bn(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)  # first derivatives: fine
    ref = torch.autograd.grad(torch.nn.BatchNorm2d(3)(x).pow(2).sum(), x)[0]
    torch.testing.assert_close(gx, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="bnorm::batch_norm: double backward is not supported"):
        gx.sum().backward()


def test_a_failed_call_changes_nothing_and_names_the_argument():
    bn = bt.BatchNorm2d(3, momentum=None)
    state = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match=r"bnorm::batch_norm: running_mean: expected 4 values \(one per channel\), "
                                         r"got 3"):
        bn(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match="input: expected a dense .strided. tensor, got layout"):
        bn(torch.randn(2, 3, 3, 3).to_sparse())
    with pytest.raises(TypeError, match="weight: expected a tensor on cpu like input, got one on meta"):
        ops.batch_norm(torch.randn(2, 3), torch.ones(3, device="meta"), None, None, None, True, 0.1, 1e-5)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---- the modules in the torch stack ----------------------------------------------------------


class _Block(torch.nn.Module):
    """conv-bn-relu, conv-bn, += identity, relu: torchvision's BasicBlock in miniature, with its
    in-place ops."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def _net(seed=0):
    torch.manual_seed(seed)
    # No bias before a BN (seed 004: BN absorbs it; its gradient would be rounding noise around 0).
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), _Block(8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 4, bias=False), torch.nn.BatchNorm1d(4))
    with torch.no_grad():  # running statistics away from their initial values, so that eval checks them
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _state_close(a, b, **tol):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, **tol, msg=ka)


def _train_step(model, x):
    model.zero_grad()
    y = model(x)
    (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph_equals_eager(fmt, training):
    torch._dynamo.reset()
    eager = bt.convert(_net()).train(training)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: a graph break is an error
    x = _x((6, 3, 8, 8), fmt=fmt, seed=4)
    for step in range(2):
        if training:
            ye, ge = _train_step(eager, x + step)
            yc, gc = _train_step(compiled, x + step)
            for a, b in zip(gc, ge):  # inductor's convolutions sum in another order: float32 rounding
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
        else:
            with torch.no_grad():
                ye, yc = eager(x + step), compiled(x + step)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    _state_close(compiled_model, eager, rtol=1e-5, atol=1e-6)
    # The graph holds bnorm's operators, not a fallback to torch's BN.
    explain = torch._dynamo.explain(copy.deepcopy(eager))(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export_module_equals_eager(training):
    model = bt.convert(_net()).train(training)
    x = _x((6, 3, 8, 8), seed=4)
    exported_src = copy.deepcopy(model)
    ep = torch.export.export(exported_src, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("bnorm" in t for t in targets), targets
    replay = ep.module()
    x2 = _x((6, 3, 8, 8), seed=9)  # not the traced input
    eager_copy = copy.deepcopy(model)
    if training:
        yr, gr = _train_step(replay, x2)
        ye, ge = _train_step(eager_copy, x2)
        for a, b in zip(gr, ge):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        with torch.no_grad():
            yr, ye = replay(x2), eager_copy(x2)
    torch.testing.assert_close(yr, ye, rtol=1e-6, atol=1e-6)
    if training:  # the running statistics were updated by the replay as by eager
        buffers = dict(replay.named_buffers())
        for k, v in eager_copy.named_buffers():
            torch.testing.assert_close(buffers[k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_writes_batchnormalization_and_runs_in_onnxruntime(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = bt.convert(_net()).eval()
    x = _x((6, 3, 8, 8), seed=4)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"])
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"])
    graph = onnx.load(path).graph
    # Standard ONNX only (the exporters may fold a BN into the Conv before it), with a real input.
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), [(n.op_type, n.domain) for n in graph.node]
    assert not any("bnorm" in n.op_type for n in graph.node)
    assert [i.name for i in graph.input] == ["x"]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for seed in (11, 12):  # inputs other than the traced one
        x2 = _x((6, 3, 8, 8), seed=seed)
        (got,) = session.run(None, {name: x2.numpy()})
        with torch.no_grad():
            expected = model(x2)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_of_a_lone_bn_is_one_batchnormalization(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    bn = bt.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    path = str(tmp_path / "bn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(bn, (_x(),), path, dynamo=dynamo, input_names=["x"])
    kinds = [n.op_type for n in onnx.load(path).graph.node]
    assert kinds.count("BatchNormalization") == 1, kinds
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2 = _x(seed=21, scale=5.0, shift=-3.0)
    (got,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), bn(x2), rtol=1e-5, atol=1e-5)


def test_jit_trace_functional_call_vmap_deepcopy_pickle_in_eval():
    model = bt.convert(_net()).eval()
    x = _x((6, 3, 8, 8), seed=4)
    x2 = _x((6, 3, 8, 8), seed=8)
    with torch.no_grad():
        expected = model(x2)
        traced = torch.jit.trace(model, (x,))
        torch.testing.assert_close(traced(x2), expected)
        params = {k: v.clone() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())
        torch.testing.assert_close(torch.func.functional_call(model, (params, buffers), (x2,)), expected)
        # vmap over examples: each sample (C, H, W) alone through the 2d parts
        conv_bn = model[:3]
        per_sample = torch.func.vmap(lambda s: conv_bn(s.unsqueeze(0)).squeeze(0))(x2)
        torch.testing.assert_close(per_sample, conv_bn(x2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(copy.deepcopy(model)(x2), expected)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x2), expected)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x2), expected)
        fresh = bt.convert(_net(seed=3)).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(x2), expected)


def test_vmap_in_training():
    # with running statistics refused, as torch refuses it; without them per-example statistics, as torch
    bn = bt.BatchNorm2d(3)
    with pytest.raises(ValueError, match="vmap: expected no running statistics in training"):
        torch.func.vmap(bn)(_x((2, 4, 3, 5, 5)))
    ours, theirs = bt.BatchNorm2d(3, track_running_stats=False), torch.nn.BatchNorm2d(3, track_running_stats=False)
    x = _x((2, 4, 3, 5, 5))
    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x), rtol=1e-5, atol=1e-5)


def test_bnorm_batch_norm_on_torch_uses_the_operator():
    x = _x().requires_grad_()
    y = bnorm.batch_norm(x, None, None, training=True)
    assert type(y.grad_fn).__name__ == "CppFunction"  # the C++ autograd kernel, not a Python Function
    assert "BatchNormFunction" in y.grad_fn.name()
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))


# ---- torchvision models, as users run them ---------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "convert-fuse"])
def test_torchvision_with_in_place_ops_matches_torch(name, fmt, fuse):
    """torchvision's model (ReLU(inplace=True), `out += identity`, ReLU6 in place) converted, against
    torch's own model: eval in float32, then two SGD steps in float64 (outputs, every gradient, the
    running statistics). In float32 the two agree in eval to 1e-5, but their training gradients
    differ by float32 rounding amplified through the depth (up to 1% of a gradient's scale in
    mobilenet_v2's first conv, where both are that far from the float64 gradient); float64 shows
    that the computation is the same."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():  # running statistics away from their initial values
        base.train()(torch.randn(8, 3, 64, 64))
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=fmt)
    ref = copy.deepcopy(base).to(memory_format=fmt).eval()
    ours = bt.convert(copy.deepcopy(ref), fuse=fuse).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    ref = copy.deepcopy(base).double().to(memory_format=fmt).train()
    ours = bt.convert(copy.deepcopy(ref), fuse=fuse).train()
    x = x.double()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    for step in range(2):
        xs = x + 0.1 * step
        torch.manual_seed(step)  # mobilenet_v2's Dropout: the same mask for both
        y_ref = ref(xs)
        torch.manual_seed(step)
        y_ours = ours(xs)
        torch.testing.assert_close(y_ours, y_ref, rtol=1e-9, atol=1e-10)
        opt_ref.zero_grad(), opt_ours.zero_grad()
        y_ref.square().mean().backward()
        y_ours.square().mean().backward()
        for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-9 * float(p.grad.abs().max()) + 1e-13,
                                       msg=lambda m, n=n: f"{n}: {m}")
        opt_ref.step(), opt_ours.step()
    ours_state = ours.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours_state[k], v, rtol=1e-9, atol=1e-10, msg=k)


# ---- DDP: two processes on loopback -------------------------------------------------------------


def _ddp_worker(rank, world, use_bnorm):
    model = _net()
    if use_bnorm:
        model = bt.convert(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        x = _x((4, 3, 8, 8), seed=100 + 10 * step + rank)  # each rank its own batch
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_ddp_two_processes_match_torch():
    """DDP with gloo over 2 processes: the converted model's state after 3 SGD steps equals that of
    torch's model under the same DDP run (BN statistics are per-rank in both: plain BatchNorm)."""
    states = {use_bnorm: run_ranks(_ddp_worker, 2, use_bnorm) for use_bnorm in (False, True)}
    for rank in range(2):
        for k, v in states[False][rank].items():
            torch.testing.assert_close(states[True][rank][k], v, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {k}")


def test_set_num_threads_reaches_the_operators():
    # The operators' library is a copy of its own (libbnorm_torch_ops.so): bnorm.set_num_threads sets both.
    before = bnorm.num_threads()
    try:
        bnorm.set_num_threads(1)
        assert ops._num_threads() == 1
        bnorm.set_num_threads(2)
        assert ops._num_threads() == 2 == bnorm.num_threads()
    finally:
        bnorm.set_num_threads(before)
    with pytest.raises(ValueError, match="n: expected >= 1, got 0"):
        ops._set_num_threads(0)


def test_empty_batch_changes_nothing_whatever_the_momentum():
    # torch returns an empty output and leaves the running statistics alone, also for momentum
    # outside [0, 1] (which bnorm applies itself).
    for momentum in (0.1, 2.0, -1.0):
        rm, rv = torch.randn(3), torch.rand(3) + 0.5
        before = rm.clone(), rv.clone()
        y = ops.batch_norm(torch.zeros(0, 3, 4), None, None, rm, rv, True, momentum, 1e-5)
        assert y.shape == (0, 3, 4)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_residual_of_another_dtype_is_refused():
    x = _x(dtype=torch.float16)
    with pytest.raises(TypeError, match="residual: expected dtype float16 .the input's., got float32"):
        ops.batch_norm_add_relu(x, x.float(), None, None, None, None, True, 0.1, 1e-5)
    bn = bt.BatchNorm2d(3)
    with pytest.raises(RuntimeError):  # a residual that cannot be added: nothing changes
        bn._bnorm_call(_x(), residual=torch.ones(2, 2))
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_buffers_that_cannot_be_written_are_refused_before_anything_changes():
    rm = torch.zeros(3)
    with torch.inference_mode():
        rv = torch.ones(3)  # an inference tensor, written outside inference mode below
    with pytest.raises(ValueError, match="running_var: expected a tensor that can be updated in place"):
        ops.batch_norm(_x(), None, None, rm, rv, True, 0.1, 1e-5)
    assert torch.equal(rm, torch.zeros(3))
    with pytest.raises(ValueError, match="running_mean: expected a tensor that can be updated in place, got one whose"):
        ops.batch_norm(_x(), None, None, torch.zeros(1).expand(3), torch.ones(3), True, 0.1, 1e-5)
