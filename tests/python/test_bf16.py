"""bfloat16 torch tensors: bnorm.batch_norm, bnorm.batch_norm_backward and bnorm.torch.BatchNorm*d
against torch's CPU mixed precision (bfloat16 input and output; float32 running statistics,
weight, bias and parameter gradients)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnorm
import bnorm.torch as bt
from _helpers import channels_last_torch, random_input, random_shape, vectors

BF16 = torch.bfloat16
LAYOUTS = ["contiguous", "channels_last"]

# Tolerances. Both torch and bnorm read the same bfloat16 values, compute in float32 (bnorm
# accumulates its sums in double) and round each bfloat16 result once. The float32 results before
# that rounding differ only by float32 noise (~1e-6 of the values' scale), but the noise can push a
# value across a bfloat16 rounding boundary: then the two bfloat16 results are one bfloat16 step
# apart, 2**-8 to 2**-7 of the value (8 significant bits). So bfloat16 tensors (output, grad_input)
# agree to one rounding, rtol = 2**-7 (~1/128), plus a small atol for the float32 noise of values
# near zero (where the step is tiny). grad_input also cancels terms of the order of
# |grad_output| (dy - mean(dy) - xhat * mean(dy * xhat)), so its atol follows grad_output's scale.
# The float32 results (running statistics, grad_weight, grad_bias) are never rounded to bfloat16:
# they get float32 tolerances (sums over a few hundred values in a different order).
BF16_TOL = dict(rtol=2**-7, atol=1e-5)
BF16_GRAD_TOL = dict(rtol=2**-7, atol=2e-3)
F32_TOL = dict(rtol=2e-4, atol=2e-5)
F32_GRAD_TOL = dict(rtol=5e-4, atol=5e-4)


def _layout(x, layout):
    if layout == "contiguous" or x.dim() < 3:
        return x
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return channels_last_torch(x)


def _bf16_input(rng, shape, layout):
    """A bfloat16 tensor (rounded from float32 values with per-channel offsets and scales)."""
    return _layout(torch.from_numpy(random_input(rng, shape, np.float32)).to(BF16), layout)


def _same_memory_format(a, b, x):
    """a (ours) has the strides of torch's result b: the operators allocate in torch's memory format
    of the input (channels_last, channels_last_3d; contiguous for ranks without one)."""
    assert a.shape == b.shape
    expected = b.stride()
    assert a.stride() == expected, (a.stride(), expected)


def _torch_side(t):
    """The copy of t (input or grad_output) that goes to torch. Ranks 4 and 5 keep their memory
    format (torch has fast bfloat16 paths for contiguous and channels_last(_3d) memory). A rank 2
    or 3 tensor with channels-last strides (a layout torch has no format for) is given to torch
    contiguous: torch's bfloat16 fallback for such strides accumulates the backward sums in bfloat16
    (grad_bias off by ~2e-2 against a float64 reference where bnorm's is off by ~1e-6), and the math
    does not depend on the layout, so torch on the same values in contiguous memory is the reference."""
    t = t.detach()
    return t.clone() if t.dim() >= 4 else t.clone(memory_format=torch.contiguous_format)


def _close(a, b, tol):
    torch.testing.assert_close(a.detach(), b.detach(), **tol)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_norm_forward_stats_and_grads_match_torch(layout, training, affine, rank):
    rng = np.random.default_rng([rank, affine, training, len(layout), 16])
    shape = random_shape(rng, rank)
    shape = (shape[0] + 3, *shape[1:])  # a few more values per channel
    rm, rv, w, b = (torch.from_numpy(v) for v in vectors(rng, shape[1], np.float32))
    trm, trv = rm.clone(), rv.clone()
    w = w.requires_grad_() if affine else None
    b = b.requires_grad_() if affine else None
    tw = w.detach().clone().requires_grad_() if affine else None
    tb = b.detach().clone().requires_grad_() if affine else None
    for step, momentum in enumerate([0.1, 0.6, 0.3]):
        x = _bf16_input(rng, shape, layout).requires_grad_()
        tx = _torch_side(x).requires_grad_()
        y = bnorm.batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=1e-4)
        ty = F.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=momentum, eps=1e-4)
        assert y.dtype == BF16 and ty.dtype == BF16
        _same_memory_format(y, ty, x)
        _close(y, ty, BF16_TOL)
        assert rm.dtype == torch.float32 and rv.dtype == torch.float32
        _close(rm, trm, F32_TOL)
        _close(rv, trv, F32_TOL)

        dy = _layout(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(BF16), layout)
        y.backward(dy)
        ty.backward(_torch_side(dy))
        assert x.grad.dtype == BF16
        _close(x.grad, tx.grad, BF16_GRAD_TOL)
        if affine:
            assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
            _close(w.grad, tw.grad, F32_GRAD_TOL)
            _close(b.grad, tb.grad, F32_GRAD_TOL)
            for p in (w, b, tw, tb):
                p.grad = None


@pytest.mark.parametrize("training, with_saved", [(True, False), (True, True), (False, False)],
                         ids=["train", "train-saved-stats", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_norm_backward_matches_torch_autograd(layout, training, with_saved):
    rng = np.random.default_rng([len(layout), training, with_saved, 7])
    shape = (6, 4, 3, 5)
    x = _bf16_input(rng, shape, layout)
    dy = _layout(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(BF16), layout)
    rm, rv, w, b = (torch.from_numpy(v) for v in vectors(rng, shape[1], np.float32))
    kwargs = {}
    if with_saved:
        mean, var = bnorm.batch_stats(x)  # float64 vectors
        kwargs = dict(save_mean=mean.float(), save_invstd=(1.0 / torch.sqrt(var + 1e-5)).float())
    gx, gw, gb = bnorm.batch_norm_backward(dy, x, rm, rv, w, b, training=training, eps=1e-5, **kwargs)

    tx, tw, tb = (t.clone().requires_grad_() for t in (_torch_side(x), w, b))
    F.batch_norm(tx, rm.clone(), rv.clone(), tw, tb, training=training, eps=1e-5).backward(_torch_side(dy))
    assert gx.dtype == BF16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    _same_memory_format(gx, tx.grad, x)
    _close(gx, tx.grad, BF16_GRAD_TOL)
    _close(gw, tw.grad, F32_GRAD_TOL)
    _close(gb, tb.grad, F32_GRAD_TOL)


MODULES = {
    "1d-rank2": (bt.BatchNorm1d, nn.BatchNorm1d, (12, 5)),
    "1d-rank3": (bt.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7)),
    "2d": (bt.BatchNorm2d, nn.BatchNorm2d, (3, 5, 4, 6)),
    "3d": (bt.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 3)),
}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", MODULES)
def test_modules_train_steps_and_eval_match_torch(kind, layout, momentum):
    ours_cls, torch_cls, shape = MODULES[kind]
    rng = np.random.default_rng([len(kind), len(layout), momentum is None, 3])
    torch.manual_seed(5)
    ref = torch_cls(shape[1], momentum=momentum)  # float32 parameters and buffers, as in torch AMP
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours = ours_cls(shape[1], momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    for step in range(4):
        ours.train(step < 3)
        ref.train(step < 3)
        x = _bf16_input(rng, shape, layout).requires_grad_()
        tx = _torch_side(x).requires_grad_()
        y, ty = ours(x), ref(tx)
        assert y.dtype == BF16
        _same_memory_format(y, ty, x)
        _close(y, ty, BF16_TOL)
        dy = _layout(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(BF16), layout)
        y.backward(dy)
        ty.backward(_torch_side(dy))
        _close(x.grad, tx.grad, BF16_GRAD_TOL)
        for (name, a), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
            assert a.dtype == torch.float32 and a.grad.dtype == torch.float32, name
            _close(a.grad, r.grad, F32_GRAD_TOL)
            a.grad = r.grad = None
        for (name, a), (_, r) in zip(ours.state_dict().items(), ref.state_dict().items()):
            if r.dtype == torch.int64:
                assert torch.equal(a, r), name
            else:
                assert a.dtype == torch.float32, name
                _close(a, r, F32_TOL)


def test_convert_model_with_bf16_activations():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ours = bt.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=BF16):
        y, ty = ours(x), ref(x)
    assert isinstance(ours[1], bt.BatchNorm2d) and y.dtype == ty.dtype
    _close(y.float(), ty.float(), BF16_TOL)


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_vectors_of_a_bf16_input_must_be_float32_or_bf16(name):
    # float64 vectors are refused by the operator, in the library's words; bfloat16 ones are taken
    # as torch's CPU BN takes them (computed in float32 copies, written back).
    x = torch.randn(4, 3, 5).to(BF16)
    args = dict(input=x, running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3),
                bias=torch.zeros(3), training=True)
    args[name] = args[name].to(torch.float64)
    with pytest.raises(TypeError, match=f"bnorm::batch_norm: {name}: expected dtype float32, got float64"):
        bnorm.batch_norm(**args)
    with pytest.raises(TypeError, match=f"mixed dtypes: {name} has dtype float64 but input has bfloat16; the "
                                        "per-channel vectors of a bfloat16 input must be float32"):
        bnorm.batch_norm_backward(torch.ones_like(x), **args)
    # torch's CPU BN takes a bfloat16 input with all vectors bfloat16 (not mixed with float32).
    args.update({k: args[k].to(BF16) for k in ("running_mean", "running_var", "weight", "bias")})
    targs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    y = bnorm.batch_norm(**args)
    t = torch.nn.functional.batch_norm(targs["input"], targs["running_mean"], targs["running_var"], targs["weight"],
                                       targs["bias"], True)
    torch.testing.assert_close(y.float(), t.float(), atol=0.05, rtol=0.02)
    for k in ("running_mean", "running_var"):
        assert args[k].dtype == BF16
        torch.testing.assert_close(args[k].float(), targs[k].float(), atol=0.02, rtol=0.02)


def test_bf16_module_parameters_are_refused_before_any_change():
    bn = bt.BatchNorm2d(3).to(torch.float64)
    with pytest.raises(TypeError, match="running_mean: expected dtype float32, got float64"):
        bn(torch.randn(2, 3, 4, 4).to(BF16))
    assert int(bn.num_batches_tracked) == 0


def test_bf16_backward_argument_errors():
    x = torch.randn(4, 3, 5).to(BF16)
    with pytest.raises(TypeError, match="mixed dtypes: grad_output has dtype float32 but input has bfloat16"):
        bnorm.batch_norm_backward(torch.ones(4, 3, 5), x, None, None, training=True)
    with pytest.raises(TypeError, match=r"save_invstd has dtype bfloat16 .* must be float32 \(or float64\)"):
        bnorm.batch_norm_backward(torch.ones_like(x), x, None, None, training=True, save_mean=torch.zeros(3),
                                  save_invstd=torch.ones(3, dtype=BF16))


def test_numpy_has_no_bf16_and_other_dtypes_stay_refused():
    with pytest.raises(TypeError, match="float16, but bnorm supports float32 and float64 only"):
        bnorm.batch_norm(np.zeros((4, 3), np.float16), None, None, training=True)
    with pytest.raises(TypeError, match="input: expected float32, float64, bfloat16 or float16, got int32"):
        bnorm.batch_norm(torch.zeros(4, 3, dtype=torch.int32), None, None, training=True)


def test_extension_checks_bf16_vectors_itself():
    # The compiled layer does not rely on the Python checks: a bfloat16 vector is refused there too.
    from bnorm import _bnorm

    x = torch.randn(4, 3).to(BF16)
    out = torch.empty_like(x)
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        _bnorm.forward(x, out, None, None, torch.ones(3, dtype=BF16), None, True, 0.1, 1e-5, None, None)
    _bnorm.forward(x, out, None, None, torch.ones(3), torch.zeros(3), True, 0.1, 1e-5, None, None)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, torch.ones(3), torch.zeros(3), training=True),
                               **BF16_TOL)
