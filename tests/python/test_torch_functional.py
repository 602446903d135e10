"""bnorm.batch_norm on torch tensors: outputs, running statistics, autograd, layouts, copies."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnorm
import bnorm.torch as bt
from bnorm import _arrays
from _helpers import DTYPES, channels_last_torch, close, is_channels_last, random_input, random_shape, vectors

LAYOUTS = ["contiguous", "channels_last"]


def _inputs(rng, rank, dtype, layout, shape=None):
    np_dt, t_dt = DTYPES[dtype]
    shape = shape or random_shape(rng, rank)
    x = torch.from_numpy(random_input(rng, shape, np_dt))
    if layout == "channels_last":
        if rank == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif rank == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        else:
            x = channels_last_torch(x)
    return x, [torch.from_numpy(v) for v in vectors(rng, shape[1], np_dt)], t_dt


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_statistics_and_gradients_match_torch(dtype, layout, training, affine, rank):
    rng = np.random.default_rng([rank, affine, training, len(layout), len(dtype), 21])
    x0, (rm, rv, w, b), t_dt = _inputs(rng, rank, dtype, layout)
    trm, trv = rm.clone(), rv.clone()
    w = w.requires_grad_() if affine else None
    b = b.requires_grad_() if affine else None
    tw = w.detach().clone().requires_grad_() if affine else None
    tb = b.detach().clone().requires_grad_() if affine else None
    for step in range(3):
        x, _, _ = _inputs(rng, rank, dtype, layout, tuple(x0.shape))
        x.requires_grad_()
        tx = x.detach().clone().requires_grad_()
        momentum = [0.1, 0.6, 0.0][step]
        y = bnorm.batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=1e-4)
        ty = F.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=momentum, eps=1e-4)
        assert y.dtype == t_dt and y.shape == x.shape and y.requires_grad
        assert y.stride() == ty.stride()  # torch's memory format: channels-last for ranks 4 and 5
        close(y, ty, t_dt)
        close(rm, trm, t_dt)
        close(rv, trv, t_dt)
        g = torch.randn_like(ty)
        (y * g).sum().backward()
        (ty * g).sum().backward()
        close(x.grad, tx.grad, t_dt, grad=True)
        if affine:
            close(w.grad, tw.grad, t_dt, grad=True)
            close(b.grad, tb.grad, t_dt, grad=True)


@pytest.mark.parametrize("training", [True, False])
def test_only_weight_requires_grad(training):
    rng = np.random.default_rng(22)
    x, (rm, rv, w, b), t_dt = _inputs(rng, 4, "float32", "channels_last", (3, 4, 5, 6))
    w.requires_grad_()
    tw = w.detach().clone().requires_grad_()
    y = bnorm.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
    ty = F.batch_norm(x, rm.clone(), rv.clone(), tw, b, training=training)
    y.sum().backward()  # an expanded (stride-0) grad_output
    ty.sum().backward()
    close(w.grad, tw.grad, t_dt, grad=True)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout, training, affine):
    rng = np.random.default_rng([len(layout), training, affine, 23])
    x, (rm, rv, w, b), _ = _inputs(rng, 4, "float64", layout)
    x = x[:2, :3, :3, :2] if layout == "contiguous" else x  # keep it small
    if layout == "channels_last":
        x = x[:2, :3, :3, :2].contiguous(memory_format=torch.channels_last)
    C = x.shape[1]
    x = x.detach().requires_grad_()
    w, b = w[:C].clone().requires_grad_(), b[:C].clone().requires_grad_()
    rm, rv = rm[:C].clone(), rv[:C].clone()
    if affine:
        fn = lambda x, w, b: bnorm.batch_norm(x, rm, rv, w, b, training=training)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b))
    else:
        fn = lambda x: bnorm.batch_norm(x, rm, rv, training=training)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_float64_rank3_channels_last_and_no_running_stats():
    rng = np.random.default_rng(24)
    x = channels_last_torch(torch.from_numpy(random_input(rng, (3, 2, 4), np.float64))).requires_grad_()
    w = torch.rand(2, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.rand(2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: bnorm.batch_norm(x, None, None, w, b, training=True), (x, w, b))


def test_double_backward_is_refused():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    y = bnorm.batch_norm(x, None, None, training=True)
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_in_place_change_of_input_before_backward_is_detected():
    x = torch.randn(4, 3, 5, requires_grad=True)
    h = x * 2
    y = bnorm.batch_norm(h, None, None, training=True)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_eval_backward_uses_the_statistics_of_the_forward():
    x = torch.randn(4, 3, 5, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    tx = x.detach().clone().requires_grad_()
    y = bnorm.batch_norm(x, rm, rv, training=False)
    ty = F.batch_norm(tx, rm.clone(), rv.clone(), training=False)
    bnorm.batch_norm(torch.randn(4, 3, 5) * 5, rm, rv, training=True, momentum=1.0)  # changes rm, rv
    g = torch.randn(4, 3, 5)
    y.backward(g)
    ty.backward(g)
    close(x.grad, tx.grad, torch.float32, grad=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_copy_and_in_place_running_statistics(layout):
    rng = np.random.default_rng(25)
    x, (rm, rv, w, b), _ = _inputs(rng, 4, "float32", layout, (3, 4, 5, 6))
    w.requires_grad_()
    ptrs = rm.data_ptr(), rv.data_ptr()
    before = _arrays.copies_made
    y = bnorm.batch_norm(x, rm, rv, w, b, training=True)
    y.sum().backward()
    with torch.no_grad():
        z = bnorm.batch_norm(x, rm, rv, w, b, training=False)
    assert z.grad_fn is None and not z.requires_grad
    assert _arrays.copies_made == before
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("training", [True, False])
def test_other_strides_are_copied_and_correct(training):
    views = [lambda t: t[:, :, :, ::2], lambda t: t[:, ::2], lambda t: t.transpose(2, 3),
             lambda t: t.contiguous(memory_format=torch.channels_last)[:, :, 1:4], lambda t: t.flip(2)[:, :, 1:]]
    for view in views:
        base = torch.randn(4, 6, 5, 8, dtype=torch.float64, requires_grad=True)
        tbase = base.detach().clone().requires_grad_()
        x, tx = view(base), view(tbase)
        C = x.shape[1]
        rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
        trm, trv = rm.clone(), rv.clone()
        y = bnorm.batch_norm(x, rm, rv, training=training)
        ty = F.batch_norm(tx, trm, trv, training=training)
        # a dense copy in one of torch's memory formats, and a new tensor
        assert y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)
        assert y.data_ptr() != x.data_ptr()
        close(y, ty, torch.float64)
        close(rm, trm, torch.float64)
        g = torch.randn_like(ty)
        y.backward(g)
        ty.backward(g)
        close(base.grad, tbase.grad, torch.float64, grad=True)


@pytest.mark.parametrize("momentum", [-1.0, 2.0, float("nan")])
def test_momentum_outside_unit_interval_like_torch(momentum):
    x = torch.randn(5, 3, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    trm, trv = rm.clone(), rv.clone()
    close(bnorm.batch_norm(x, rm, rv, training=True, momentum=momentum),
          F.batch_norm(x, trm, trv, training=True, momentum=momentum), torch.float32)
    torch.testing.assert_close(rm, trm, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, trv, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_strided_running_statistics_are_updated_in_place():
    x = torch.randn(5, 3, 4)
    store = torch.zeros(3, 2)
    store[:, 1] = 1
    t = store.clone()
    bnorm.batch_norm(x, store[:, 0], store[:, 1], training=True)
    F.batch_norm(x, t[:, 0], t[:, 1], training=True)
    close(store, t, torch.float32)


@pytest.mark.parametrize("training", [True, False])
def test_empty_input(training):
    x = torch.zeros(0, 3, 4, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = bnorm.batch_norm(x, rm, rv, training=training)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 3, 4)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_backward_function_on_torch_tensors():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    dy = torch.randn_like(x)
    gi, gw, gb = bnorm.batch_norm_backward(dy, x, None, None, w, b, training=True)
    tx, tw, tb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    F.batch_norm(tx, None, None, tw, tb, training=True).backward(dy)
    close(gi, tx.grad, torch.float64, grad=True)
    close(gw, tw.grad, torch.float64, grad=True)
    close(gb, tb.grad, torch.float64, grad=True)
    mean, var = bt.batch_stats(x)
    close(mean, x.mean(dim=(0, 2)), torch.float64)
    close(var, x.var(dim=(0, 2), unbiased=False), torch.float64)


def test_functional_is_exported_by_bnorm_torch():
    assert bt.batch_norm is bnorm.batch_norm
    x = torch.randn(3, 2, 4)
    close(bt.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True), torch.float32)


def test_extension_sees_torch_memory_without_copies():
    from bnorm import _bnorm

    # In place through the extension: the input tensor itself changes.
    x = torch.randn(4, 3, 5).contiguous(memory_format=torch.contiguous_format) * 3 + 1
    expected = F.batch_norm(x, None, None, training=True)
    _bnorm.forward(x, x, None, None, None, None, True, 0.1, 1e-5, None, None)
    close(x, expected, torch.float32)
    # The library sees the tensors' own addresses: a partial overlap is detected.
    buf = torch.zeros(4 * 3 * 5 + 1)
    with pytest.raises(ValueError, match="partial overlap"):
        _bnorm.forward(buf[:-1].view(4, 3, 5), buf[1:].view(4, 3, 5), None, None, None, None, True, 0.1, 1e-5,
                       None, None)
