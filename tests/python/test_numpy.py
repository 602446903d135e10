"""bnorm.batch_norm, batch_norm_backward and batch_stats on NumPy arrays, against torch."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnorm
from bnorm import _arrays
from _helpers import DTYPES, channels_last_numpy, close, is_channels_last, random_input, random_shape, vectors

LAYOUTS = ["channels_first", "channels_last"]


def _t(a):
    return None if a is None else torch.from_numpy(np.array(a, copy=True))


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_running_stats_match_torch(dtype, layout, training, affine, rank):
    np_dt, t_dt = DTYPES[dtype]
    rng = np.random.default_rng([rank, affine, training, len(layout), len(dtype)])
    shape = random_shape(rng, rank)
    rm, rv, w, b = vectors(rng, shape[1], np_dt)
    if not affine:
        w = b = None
    trm, trv, tw, tb = _t(rm), _t(rv), _t(w), _t(b)
    rm_id, rv_id = id(rm), id(rv)
    for step in range(3):
        x = random_input(rng, shape, np_dt)
        if layout == "channels_last":
            x = channels_last_numpy(x)
        momentum = [0.1, 0.5, 1.0][step]
        y = bnorm.batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=1e-3)
        ty = F.batch_norm(torch.from_numpy(x), trm, trv, tw, tb, training=training, momentum=momentum, eps=1e-3)
        assert isinstance(y, np.ndarray) and y.dtype == np_dt and y.shape == shape
        if layout == "channels_last" and rank > 2:
            assert is_channels_last(y)
        else:
            assert y.flags.c_contiguous
        close(y, ty, t_dt)
        close(rm, trm, t_dt)
        close(rv, trv, t_dt)
    assert id(rm) == rm_id and id(rv) == rv_id


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", ["eval", "train", "train with saved statistics"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_autograd(dtype, layout, mode, affine, rank):
    training, given_stats = mode != "eval", mode.endswith("statistics")
    np_dt, t_dt = DTYPES[dtype]
    rng = np.random.default_rng([rank, affine, training, len(layout), len(dtype), given_stats, 7])
    shape = random_shape(rng, rank)
    x = random_input(rng, shape, np_dt)
    dy = rng.standard_normal(shape).astype(np_dt)
    if layout == "channels_last":
        x = channels_last_numpy(x)
    rm, rv, w, b = vectors(rng, shape[1], np_dt)
    if not affine:
        w = b = None
    eps = 1e-4
    tx = _t(x).requires_grad_()
    tw = _t(w).requires_grad_() if affine else None
    tb = _t(b).requires_grad_() if affine else None
    ty = F.batch_norm(tx, _t(rm), _t(rv), tw, tb, training=training, eps=eps)
    ty.backward(torch.from_numpy(dy))
    kwargs = {}
    if given_stats:
        mean, var = bnorm.batch_stats(x)
        kwargs = dict(save_mean=mean, save_invstd=1.0 / np.sqrt(var + eps))
    gi, gw, gb = bnorm.batch_norm_backward(dy, x, rm, rv, w, b, training, 0.1, eps, **kwargs)
    assert gi.shape == shape and gi.dtype == np_dt
    close(gi, tx.grad, t_dt, grad=True)
    if affine:
        close(gw, tw.grad, t_dt, grad=True)
        close(gb, tb.grad, t_dt, grad=True)
    else:
        assert gw is None and gb is None


def test_backward_with_float32_saved_statistics():
    rng = np.random.default_rng(3)
    x = random_input(rng, (6, 4, 5), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mean, var = bnorm.batch_stats(x)
    sm, si = mean.astype(np.float32), (1 / np.sqrt(var + 1e-5)).astype(np.float32)
    a = bnorm.batch_norm_backward(dy, x, None, None, training=True, save_mean=sm, save_invstd=si)
    b = bnorm.batch_norm_backward(dy, x, None, None, training=True)
    close(a[0], b[0], torch.float32, grad=True)


@pytest.mark.parametrize("momentum", [-0.5, 1.5, 3.0, float("nan")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_outside_unit_interval_like_torch(dtype, momentum):
    np_dt, t_dt = DTYPES[dtype]
    rng = np.random.default_rng(11)
    x = random_input(rng, (5, 3, 4), np_dt)
    rm, rv, w, b = vectors(rng, 3, np_dt)
    trm, trv = _t(rm), _t(rv)
    y = bnorm.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum)
    ty = F.batch_norm(torch.from_numpy(x), trm, trv, _t(w), _t(b), training=True, momentum=momentum)
    close(y, ty, t_dt)
    torch.testing.assert_close(torch.from_numpy(rm), trm, equal_nan=True, **{"rtol": 1e-5, "atol": 1e-5})
    torch.testing.assert_close(torch.from_numpy(rv), trv, equal_nan=True, **{"rtol": 1e-5, "atol": 1e-5})


@pytest.mark.parametrize("dtype", DTYPES)
def test_eps_zero_in_eval_like_torch(dtype):
    np_dt, t_dt = DTYPES[dtype]
    rng = np.random.default_rng(12)
    x = random_input(rng, (4, 3, 5), np_dt)
    rm, rv, w, b = vectors(rng, 3, np_dt)
    y = bnorm.batch_norm(x, rm, rv, w, b, training=False, eps=0.0)
    close(y, F.batch_norm(_t(x), _t(rm), _t(rv), _t(w), _t(b), training=False, eps=0.0), t_dt)
    dy = rng.standard_normal(x.shape).astype(np_dt)
    gi, gw, gb = bnorm.batch_norm_backward(dy, x, rm, rv, w, b, training=False, eps=0.0)
    tx, tw, tb = _t(x).requires_grad_(), _t(w).requires_grad_(), _t(b).requires_grad_()
    F.batch_norm(tx, _t(rm), _t(rv), tw, tb, training=False, eps=0.0).backward(_t(dy))
    close(gi, tx.grad, t_dt, grad=True)
    close(gw, tw.grad, t_dt, grad=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (0, 3), (2, 0, 5), (0, 3, 2, 2)])
def test_empty_inputs_like_torch(shape, training):
    x = np.zeros(shape, np.float32)
    C = shape[1]
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    y = bnorm.batch_norm(x, rm, rv, training=training)
    ty = F.batch_norm(torch.from_numpy(x), torch.full((C,), 0.5), torch.full((C,), 2.0), training=training)
    assert y.shape == tuple(ty.shape) == shape
    assert np.all(rm == 0.5) and np.all(rv == 2.0)
    gi, gw, gb = bnorm.batch_norm_backward(x, x, rm, rv, np.ones(C, np.float32), np.zeros(C, np.float32), training)
    assert gi.shape == shape and np.all(gw == 0) and np.all(gb == 0)


def _strided_inputs(rng):
    base = random_input(rng, (4, 6, 5, 8), np.float64)
    yield "sliced spatial", base[:, :, :, ::2]
    yield "sliced channels", base[:, ::2]
    yield "fortran order", np.asfortranarray(base)
    yield "channels-last sliced", channels_last_numpy(base)[:, :, 1:4]
    yield "negative strides", base[:, :, ::-1]
    yield "transposed spatial", base.transpose(0, 1, 3, 2)


@pytest.mark.parametrize("training", [True, False])
def test_other_strides_are_copied_and_correct(training):
    rng = np.random.default_rng(5)
    for name, x in _strided_inputs(rng):
        C = x.shape[1]
        rm, rv, w, b = vectors(rng, C, np.float64)
        trm, trv = _t(rm), _t(rv)
        before = _arrays.copies_made
        y = bnorm.batch_norm(x, rm, rv, w, b, training=training)
        assert _arrays.copies_made == before + 1, name
        ty = F.batch_norm(torch.from_numpy(np.ascontiguousarray(x)), trm, trv, _t(w), _t(b), training=training)
        close(y, ty, torch.float64)
        close(rm, trm, torch.float64)
        dy = rng.standard_normal(x.shape)[..., ::-1]  # strided grad_output too
        gi, _, _ = bnorm.batch_norm_backward(dy, x, rm, rv, w, b, training)
        tx = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
        F.batch_norm(tx, _t(rm), _t(rv), _t(w), _t(b), training=training).backward(torch.from_numpy(dy.copy()))
        close(gi, tx.grad, torch.float64, grad=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense_inputs_are_not_copied(layout):
    rng = np.random.default_rng(6)
    x = random_input(rng, (3, 4, 5, 6), np.float32)
    if layout == "channels_last":
        x = channels_last_numpy(x)
    x.flags.writeable = False  # read-only inputs are fine
    rm, rv, w, b = vectors(rng, 4, np.float32)
    before = _arrays.copies_made
    y = bnorm.batch_norm(x, rm, rv, w, b, training=True)
    bnorm.batch_norm_backward(y, x, rm, rv, w, b, True)
    assert _arrays.copies_made == before
    assert is_channels_last(y) == (layout == "channels_last")


def test_strided_running_statistics_are_updated_in_place():
    rng = np.random.default_rng(8)
    x = random_input(rng, (5, 3, 4), np.float32)
    store = np.zeros((3, 2), np.float32)
    store[:, 1] = 1
    rm, rv = store[:, 0], store[:, 1]  # strided views
    trm, trv = torch.zeros(3), torch.ones(3)
    w = np.arange(6, dtype=np.float32)[::2] + 1  # strided weight
    y = bnorm.batch_norm(x, rm, rv, w, None, training=True)
    ty = F.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w.copy()), None, training=True)
    close(y, ty, torch.float32)
    close(store[:, 0], trm, torch.float32)
    close(store[:, 1], trv, torch.float32)


def test_vectors_of_other_shapes_with_c_values():
    rng = np.random.default_rng(9)
    x = random_input(rng, (4, 3, 5), np.float64)
    rm, rv = np.zeros((1, 3)), np.ones((3, 1))
    y = bnorm.batch_norm(x, rm, rv, np.ones((1, 3, 1)), None, training=True)
    ty = F.batch_norm(torch.from_numpy(x), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                      training=True)
    close(y, ty, torch.float64)
    assert rm.shape == (1, 3) and np.any(rm != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_stats(dtype):
    np_dt, _ = DTYPES[dtype]
    rng = np.random.default_rng(10)
    x = random_input(rng, (7, 5, 3, 4), np_dt)
    for arr in (x, channels_last_numpy(x)):
        mean, var = bnorm.batch_stats(arr)
        assert mean.dtype == np.float64 and var.dtype == np.float64
        ref = x.astype(np.float64)
        # float64 data is summed in double; float32 data in float32 blocks merged in double, which
        # docs/numerics.md bounds by 4e-6 relative on the variance and 32 ulp of the std on the mean.
        tol = dict(rtol=1e-12, atol=1e-12) if np_dt == np.float64 else dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), **tol)
        np.testing.assert_allclose(var, ref.var(axis=(0, 2, 3)), **tol)


def test_statistics_exact_at_large_offset():
    # |mean| / std = 1e4 in float32: bnorm's double statistics keep the variance exact.
    rng = np.random.default_rng(13)
    x = (1e4 + rng.standard_normal((64, 2, 32))).astype(np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    y = bnorm.batch_norm(x, rm, rv, training=True, momentum=1.0)
    ref = x.astype(np.float64)
    m = ref.shape[0] * ref.shape[2]
    np.testing.assert_allclose(rv, ref.var(axis=(0, 2)) * m / (m - 1), rtol=1e-6)
    np.testing.assert_allclose(y.std(axis=(0, 2), dtype=np.float64), 1.0, rtol=1e-4)


def test_concurrent_calls_release_the_gil():
    rng = np.random.default_rng(14)
    xs = [random_input(rng, (8, 16, 24, 24), np.float32) for _ in range(4)]
    expected = [bnorm.batch_norm(x, None, None, training=True) for x in xs]
    results = [None] * len(xs)

    def work(i):
        for _ in range(3):
            results[i] = bnorm.batch_norm(xs[i], None, None, training=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, e in zip(results, expected):
        np.testing.assert_array_equal(r, e)


def test_num_threads():
    n = bnorm.num_threads()
    assert n >= 1
    try:
        bnorm.set_num_threads(1)
        assert bnorm.num_threads() == 1
        x = random_input(np.random.default_rng(15), (4, 3, 6), np.float64)
        y1 = bnorm.batch_norm(x, None, None, training=True)
    finally:
        bnorm.set_num_threads(n)
    np.testing.assert_allclose(y1, bnorm.batch_norm(x, None, None, training=True), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="set_num_threads"):
        bnorm.set_num_threads(0)


def test_import_does_not_import_torch():
    code = "import sys, bnorm; assert 'torch' not in sys.modules; import bnorm.torch; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_torch_attribute():
    import bnorm.torch as bt

    assert bnorm.torch is bt
    with pytest.raises(AttributeError):
        bnorm.no_such_thing  # noqa: B018


def test_unaligned_arrays_are_copied():
    rng = np.random.default_rng(16)
    ref = random_input(rng, (4, 3, 5), np.float32)
    raw = np.zeros(ref.nbytes + 1, np.uint8)
    x = np.frombuffer(raw.data, dtype=np.float32, count=ref.size, offset=1).reshape(ref.shape)
    x[...] = ref
    rraw = np.zeros(3 * 4 + 1, np.uint8)
    rm = np.frombuffer(rraw.data, dtype=np.float32, count=3, offset=1)
    assert not x.flags.aligned and not rm.flags.aligned
    rv = np.ones(3, np.float32)
    trm = torch.zeros(3)
    y = bnorm.batch_norm(x, rm, rv, training=True)
    ty = F.batch_norm(torch.from_numpy(ref), trm, torch.ones(3), training=True)
    close(y, ty, torch.float32)
    close(rm, trm, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_above_the_librarys_limit(layout):
    # Beyond 8 dims the extension passes (N, C, S), S the product of the spatial sizes: the same
    # computation as on the rank-3 reshape, in either layout.
    rng = np.random.default_rng(12)
    shape = (3, 4, 2, 1, 2, 1, 1, 2, 1, 3)
    x = random_input(rng, shape, np.float64)
    if layout == "channels_last":
        x = channels_last_numpy(x)
    assert _arrays.layout_of(x.shape, _arrays.NumpyArrays.strides(x)) == layout
    rm, rv, w, b = vectors(rng, 4, np.float64)
    rm3, rv3 = rm.copy(), rv.copy()
    y = bnorm.batch_norm(x, rm, rv, w, b, training=True)
    y3 = bnorm.batch_norm(np.ascontiguousarray(x).reshape(3, 4, -1), rm3, rv3, w, b, training=True)
    np.testing.assert_allclose(np.ascontiguousarray(y).reshape(3, 4, -1), y3, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, rm3, rtol=1e-12)
    assert is_channels_last(y) == (layout == "channels_last")
    with pytest.raises(ValueError, match=r"weight: expected 4 values \(one per channel\), got 3"):
        bnorm.batch_norm(x, rm, rv, w[:3], b, training=True)


def test_info_reports_the_active_isa_threads_and_choices():
    text = bnorm.info()
    assert text.startswith("CPU: ") and "\nactive: " in text
    assert f"threads: {bnorm.num_threads()}" in text
    assert "32x512x7x7 channels_first: forward " in text
