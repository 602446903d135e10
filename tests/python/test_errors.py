"""Every misuse raises TypeError (wrong kind, dtype or device of argument) or ValueError (wrong
size or value) with a clear message, under torch's conditions, and changes nothing."""

import numpy as np
import pytest
import torch

import bnorm
import bnorm.torch as bt
from bnorm import _bnorm

KINDS = ["numpy", "torch"]


def make(kind):
    """A factory of arrays of one kind: make(shape, dtype='float32', fill=0.0)."""

    def f(shape, dtype="float32", fill=0.0):
        a = np.full(shape, fill, dtype=dtype)
        return a if kind == "numpy" else torch.from_numpy(a)

    return f


@pytest.fixture(params=KINDS)
def arr(request):
    return make(request.param)


@pytest.fixture
def ok(arr):
    """Good arguments: input (4, 3, 5), running_mean, running_var, weight, bias."""
    x = arr((4, 3, 5))
    x[0, 0, 0] = 1.0
    return dict(input=x, running_mean=arr((3,)), running_var=arr((3,), fill=1.0), weight=arr((3,), fill=1.0),
                bias=arr((3,)))


def call(args, **over):
    a = dict(args)
    a.update(over)
    return bnorm.batch_norm(**a)


# ---- TypeError -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None, 3.0, "x"])
def test_input_not_an_array(ok, bad):
    with pytest.raises(TypeError, match="input must be a numpy.ndarray or a torch.Tensor"):
        call(ok, input=bad)


@pytest.mark.parametrize("dtype", ["float16", "int32", "int64", "complex64", "bool"])
def test_unsupported_input_dtype(arr, ok, dtype):
    torch_kind = isinstance(arr((1,)), torch.Tensor)
    if torch_kind and dtype == "float16":
        pytest.skip("torch float16 is supported (computed in float32, like torch's CPU BN): test_torch_ops.py")
    match = ("input: expected float32, float64, bfloat16 or float16, got " if torch_kind
             else "supports float32 and float64 only")
    with pytest.raises(TypeError, match=match):
        call(ok, input=arr((4, 3, 5), dtype=dtype))


def test_bfloat16_and_big_endian():
    # bfloat16 torch tensors are supported (tests/python/test_bf16.py), with float32 vectors only.
    y = bnorm.batch_norm(torch.zeros(4, 3, dtype=torch.bfloat16), None, None, training=True)
    assert y.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="weight: expected dtype float32, got float64"):
        bnorm.batch_norm(torch.zeros(4, 3, dtype=torch.bfloat16), None, None, torch.ones(3, dtype=torch.float64),
                         training=True)
    with pytest.raises(TypeError, match="byte order"):
        bnorm.batch_norm(np.zeros((4, 3), ">f4"), None, None, training=True)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_mixed_dtypes(arr, ok, name):
    match = (f"{name}: expected dtype float32, got float64" if isinstance(ok["input"], torch.Tensor)
             else f"mixed dtypes: {name} has dtype float64 but input has float32")
    with pytest.raises(TypeError, match=match):
        call(ok, **{name: arr((3,), dtype="float64", fill=1.0)})


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_mixed_kinds_and_non_arrays(ok, name):
    x = ok["input"]
    other = torch.zeros(3) if isinstance(x, np.ndarray) else np.zeros(3, np.float32)
    with pytest.raises(TypeError, match=f"{name} must be a"):
        call(ok, **{name: other})
    with pytest.raises(TypeError, match=f"{name} must be a .* not list"):
        call(ok, **{name: [0.0, 0.0, 0.0]})


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_training_not_a_bool(ok, bad):
    with pytest.raises(TypeError, match="training must be a bool"):
        call(ok, training=bad)


def test_momentum_and_eps_not_floats(ok):
    with pytest.raises(TypeError, match="momentum must be a float, not NoneType.*BatchNorm2d"):
        call(ok, training=True, momentum=None)
    with pytest.raises(TypeError, match="momentum must be a float"):
        call(ok, training=True, momentum="0.1")
    with pytest.raises(TypeError, match="eps must be a float"):
        call(ok, eps=None)
    with pytest.raises(TypeError, match="eps must be a float"):
        call(ok, eps="1e-5")


@pytest.mark.parametrize("name", ["input", "running_mean", "weight"])
def test_tensors_off_the_cpu(name):
    args = dict(input=torch.randn(4, 3, 5), running_mean=torch.zeros(3), running_var=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3))
    if name == "input":  # a meta input is computed on the meta device (shapes only): test_torch_ops.py
        args = {k: v.to("meta") for k, v in args.items()}
        args["weight"] = torch.ones(3)
        name, where, like = "weight", "cpu", "meta"
    else:
        args[name] = args[name].to("meta")
        where, like = "meta", "cpu"
    with pytest.raises(TypeError, match=f"{name}: expected a tensor on {like} like input, got one on {where}"):
        bnorm.batch_norm(**args)
    if torch.cuda.is_available():
        args[name] = args[name].to("cuda")
        with pytest.raises(TypeError, match="CPU only"):
            bnorm.batch_norm(**args)


def test_sparse_tensor():
    with pytest.raises(TypeError, match="dense"):
        bnorm.batch_norm(torch.randn(4, 3).to_sparse(), None, None, training=True)


# ---- ValueError ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (3,)])
def test_rank_below_two(arr, ok, shape):
    with pytest.raises(ValueError, match=rf"bnorm::batch_norm: input: expected a tensor of rank >= 2 \(N, C, \.\.\.\), "
                                         rf"got rank {len(shape)}"):
        call(ok, input=arr(shape))


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [2, 4, 0])
def test_vector_sizes(arr, ok, name, size):
    rm = ok["running_mean"]
    with pytest.raises(ValueError, match=rf"{name}: expected 3 values \(one per channel\), got {size}$"):
        call(ok, training=True, **{name: arr((size,), fill=1.0)})
    assert float(rm.sum()) == 0.0  # nothing written
    with pytest.raises(ValueError, match=rf"{name}: expected 3 values \(one per channel\), got {size}$"):
        call(ok, **{name: arr((size,), fill=1.0)})


@pytest.mark.parametrize("training", [True, False])
def test_running_stats_both_or_neither(ok, training):
    with pytest.raises(ValueError, match="running_var: expected a vector like running_mean, got none"):
        call(ok, running_var=None, training=training)
    with pytest.raises(ValueError, match="running_var: expected none like running_mean, got a vector"):
        call(ok, running_mean=None, training=training)


def test_empty_batch_in_training_is_checked_like_any(arr):
    # torch returns an empty output for a batch without values in training; the library's other
    # checks still apply to it.
    x = arr((0, 3, 5))
    assert bnorm.batch_norm(x, None, None, arr((3,)), training=True).shape == (0, 3, 5)
    with pytest.raises(ValueError, match=r"weight: expected 3 values \(one per channel\), got 4"):
        bnorm.batch_norm(x, None, None, arr((4,)), training=True)
    rm = arr((3,), fill=0.5)
    with pytest.raises(ValueError, match="running_var: expected a vector like running_mean, got none"):
        bnorm.batch_norm(x, rm, None, training=True)
    with pytest.raises(ValueError, match=r"eps: expected a finite value > 0, got 0"):
        bnorm.batch_norm(x, rm, arr((3,)), training=True, eps=0.0)
    assert float(rm.sum()) == 1.5


def test_momentum_outside_the_unit_interval_is_checked_like_any(arr):
    # torch takes any momentum (the library [0, 1]): the library still checks the running statistics.
    x = arr((4, 3, 5))
    x[0, 0, 0] = 1.0
    rm, rv = arr((4,)), arr((4,), fill=1.0)
    with pytest.raises(ValueError, match=r"running_mean: expected 3 values \(one per channel\), got 4"):
        bnorm.batch_norm(x, rm, rv, training=True, momentum=1.5)
    assert float(rm.sum()) == 0.0 and float(rv.sum()) == 4.0


def test_eval_needs_running_stats(ok):
    with pytest.raises(ValueError, match="running_mean: expected running statistics when training=false, got none"):
        call(ok, running_mean=None, running_var=None, training=False)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_one_value_per_channel_when_training(arr, ok, shape):
    rm = ok["running_mean"]
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        call(ok, input=arr(shape, fill=2.0), training=True)
    assert float(rm.sum()) == 0.0
    call(ok, input=arr(shape, fill=2.0), training=False)  # fine in eval, like torch


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_not_positive_in_training(ok, eps):
    with pytest.raises(ValueError, match=r"bnorm::batch_norm: eps: expected a finite value > 0, got -?[01]$"):
        call(ok, training=True, eps=eps)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"eps: expected a finite value > 0, got (nan|inf)"):
            call(ok, training=True, eps=bad)
    assert float(ok["running_mean"].sum()) == 0.0


def test_eps_negative_or_not_finite(ok):
    # One rule and one message for NumPy arrays and torch tensors: the library's (Policy::Torch).
    with pytest.raises(ValueError, match=r"bnorm::batch_norm: eps: expected a finite value >= 0 in eval, got -1e-05"):
        call(ok, training=False, eps=-1e-5)
    for eps in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps: expected a finite value >= 0 in eval"):
            call(ok, eps=eps)


def test_running_stats_requiring_grad():
    x = torch.randn(4, 3)
    for training in (True, False):
        with pytest.raises(ValueError, match="running_mean: expected a tensor that does not require grad"):
            bnorm.batch_norm(x, torch.zeros(3, requires_grad=True), torch.ones(3), training=training)


def test_read_only_running_stats_in_training():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        bnorm.batch_norm(x, rm, rv, training=True)
    assert np.all(rm == 0)
    bnorm.batch_norm(x, rm, rv, training=False)  # reading is fine


# ---- batch_norm_backward and batch_stats -----------------------------------------------------


def test_backward_errors(arr):
    x, dy = arr((4, 3, 5), fill=1.0), arr((4, 3, 5), fill=1.0)
    rm, rv = arr((3,)), arr((3,), fill=1.0)
    with pytest.raises(ValueError, match=r"grad_output: expected the shape of input \[4, 3, 5\], got \[4, 3, 6\]"):
        bnorm.batch_norm_backward(arr((4, 3, 6)), x, rm, rv)
    with pytest.raises(ValueError, match=r"grad_output: expected a tensor of rank >= 2 .* got rank 1 with shape \[5\]"):
        bnorm.batch_norm_backward(arr((5,)), x, rm, rv, training=True)
    with pytest.raises(TypeError, match="mixed dtypes: grad_output"):
        bnorm.batch_norm_backward(arr((4, 3, 5), dtype="float64"), x, rm, rv)
    with pytest.raises(TypeError, match="grad_output must be a"):
        bnorm.batch_norm_backward(None, x, rm, rv)
    with pytest.raises(ValueError, match="running_mean: expected running_mean and running_var when training=false, got none"):
        bnorm.batch_norm_backward(dy, x, None, None, training=False)
    with pytest.raises(ValueError, match="running_var: expected a vector like running_mean, got none"):
        bnorm.batch_norm_backward(dy, x, rm, None, training=True)
    with pytest.raises(ValueError, match="running_var: expected none like running_mean, got a vector"):
        bnorm.batch_norm_backward(dy, x, None, rv, training=True)
    with pytest.raises(ValueError, match=r"bias: expected 3 values \(one per channel\), got 2"):
        bnorm.batch_norm_backward(dy, x, rm, rv, arr((3,)), arr((2,)))
    with pytest.raises(ValueError, match=r"running_var: expected 3 values \(one per channel\), got 4"):
        bnorm.batch_norm_backward(dy, x, rm, arr((4,)), training=True)
    with pytest.raises(ValueError, match="save_mean and save_invstd must either both"):
        bnorm.batch_norm_backward(dy, x, None, None, training=True, save_mean=arr((3,)))
    with pytest.raises(ValueError, match=r"save_invstd: expected 3 values \(one per channel\), got 2"):
        bnorm.batch_norm_backward(dy, x, None, None, training=True, save_mean=arr((3,)), save_invstd=arr((2,)))
    with pytest.raises(ValueError, match=r"weight: expected 3 values \(one per channel\), got 4"):
        bnorm.batch_norm_backward(dy, x, rm, rv, arr((4,)))
    with pytest.raises(TypeError, match="training must be a bool"):
        bnorm.batch_norm_backward(dy, x, rm, rv, training="no")
    with pytest.raises(ValueError, match="eps must be positive during training"):
        bnorm.batch_norm_backward(dy, x, rm, rv, training=True, eps=0.0)


def test_batch_stats_errors(arr):
    with pytest.raises(TypeError, match="input must be"):
        bnorm.batch_stats([[1.0]])
    with pytest.raises(ValueError, match=r"bnorm::batch_stats: input: expected a tensor of rank >= 2"):
        bnorm.batch_stats(arr((3,)))
    with pytest.raises(TypeError, match="float32(, float64 and bfloat16| and float64) only"):
        bnorm.batch_stats(arr((2, 3), dtype="float16"))
    with pytest.raises(ValueError, match=r"bnorm::batch_stats: input: expected at least 1 value per channel, got shape \[0, 3\]"):
        bnorm.batch_stats(arr((0, 3)))


# ---- modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape, message",
    [
        (bt.BatchNorm1d, (2, 3, 4, 5), r"expected 2D or 3D input \(got 4D input\)"),
        (bt.BatchNorm1d, (3,), r"expected 2D or 3D input \(got 1D input\)"),
        (bt.BatchNorm2d, (2, 3, 4), r"expected 4D input \(got 3D input\)"),
        (bt.BatchNorm3d, (2, 3, 4, 5), r"expected 5D input \(got 4D input\)"),
    ],
)
def test_module_rank(cls, shape, message):
    with pytest.raises(ValueError, match=message):
        cls(3)(torch.randn(shape))


def test_module_errors_change_nothing():
    bn = bt.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"running_mean: expected 4 values \(one per channel\), got 3"):
        bn(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match="input: expected float32, float64, bfloat16 or float16, got int64"):
        bn(torch.zeros(2, 3, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="input: expected a dense .strided. tensor"):
        bn(torch.randn(2, 3, 3, 3).to_sparse())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        bn([1.0, 2.0])
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    with pytest.raises(TypeError, match="expected dtype float64, got float32"):
        bn(torch.randn(2, 3, 3, 3, dtype=torch.float64))
    # The cumulative average counts a batch only once the library has accepted it.
    cumulative = bt.BatchNorm2d(3, momentum=None)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        cumulative(torch.randn(1, 3, 1, 1))
    assert int(cumulative.num_batches_tracked) == 0
    x = torch.randn(4, 3, 2, 2)
    cumulative(x)
    assert int(cumulative.num_batches_tracked) == 1
    torch.testing.assert_close(cumulative.running_mean, x.mean(dim=(0, 2, 3)))  # factor 1/1 for the first batch


# ---- the extension called directly: bad arrays raise, never crash ---------------------------


def test_extension_rejects_bad_arrays():
    x = np.zeros((4, 3, 5), np.float32)
    y = np.empty_like(x)
    with pytest.raises(TypeError, match="expected dtype float32, float64 or bfloat16, got DLPack type code 0"):
        _bnorm.forward(x.astype(np.int32), y.astype(np.int32), None, None, None, None, True, 0.1, 1e-5, None, None)
    with pytest.raises(ValueError, match="output: expected the shape of input"):
        _bnorm.forward(x, np.empty((4, 3, 6), np.float32), None, None, None, None, True, 0.1, 1e-5, None, None)
    with pytest.raises(TypeError, match="expected the dtype of input"):
        _bnorm.forward(x, np.empty((4, 3, 5)), None, None, None, None, True, 0.1, 1e-5, None, None)
    with pytest.raises(ValueError, match=r"bnorm::batch_norm: input: expected a tensor of rank >= 2 .* got rank 1"):
        _bnorm.forward(np.zeros(3, np.float32), np.zeros(3, np.float32), None, None, None, None, True, 0.1, 1e-5,
                       None, None)
    with pytest.raises(ValueError, match="dense channels-first"):
        big = np.zeros((4, 3, 10), np.float32)
        _bnorm.forward(big[:, :, ::2], y, None, None, None, None, True, 0.1, 1e-5, None, None)
    with pytest.raises(ValueError, match="contiguous values"):
        _bnorm.forward(x, y, None, None, np.ones(6, np.float32)[::2], None, True, 0.1, 1e-5, None, None)
    with pytest.raises(ValueError, match="weight: expected 3 values"):
        _bnorm.forward(x, y, None, None, np.ones(4, np.float32), None, True, 0.1, 1e-5, None, None)
    # A given vector of no values is not None, even where DLPack gives it a null pointer.
    assert torch.empty(0).data_ptr() == 0
    with pytest.raises(ValueError, match=r"weight: expected 3 values \(one per channel\), got 0"):
        _bnorm.forward(torch.zeros(4, 3, 5), torch.zeros(4, 3, 5), None, None, torch.empty(0), None, True, 0.1, 1e-5,
                       None, None)
    # The extension takes torch's rules (the library's Policy::Torch): any momentum, with torch's update.
    x2, rm = np.arange(60, dtype=np.float32).reshape(4, 3, 5), np.zeros(3, np.float32)
    _bnorm.forward(x2, y, rm, np.ones(3, np.float32), None, None, True, 2.0, 1e-5, None, None)
    np.testing.assert_allclose(rm, 2.0 * x2.astype(np.float64).mean(axis=(0, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        _bnorm.forward(x, y, None, None, None, None, True, 0.1, 0.0, None, None)
    with pytest.raises(ValueError, match="partial overlap"):
        buf = np.zeros(4 * 3 * 5 + 1, np.float32)
        _bnorm.forward(buf[:-1].reshape(4, 3, 5), buf[1:].reshape(4, 3, 5), None, None, None, None, True, 0.1, 1e-5,
                       None, None)
    with pytest.raises(ValueError, match="save_mean"):
        _bnorm.backward(x, x, None, None, None, None, None, True, 1e-5, y, None, None)
    with pytest.raises(ValueError, match="running_mean"):
        _bnorm.forward(x, y, None, None, None, None, False, 0.1, 1e-5, None, None)
    with pytest.raises(ValueError, match="running_var: expected 3 values"):
        _bnorm.forward_eval(x, y, np.zeros(3, np.float32), np.ones(2, np.float32), None, None, 1e-5)
    with pytest.raises(ValueError, match="at least 1 value per channel"):
        _bnorm.batch_stats(np.zeros((0, 3), np.float32), np.zeros(3), np.zeros(3))
    with pytest.raises(TypeError):
        readonly = np.empty_like(x)
        readonly.flags.writeable = False
        _bnorm.forward(x, readonly, None, None, None, None, True, 0.1, 1e-5, None, None)
    with pytest.raises(TypeError):
        _bnorm.forward("x", y, None, None, None, None, True, 0.1, 1e-5, None, None)
    with pytest.raises(TypeError):
        _bnorm.forward(x, y, None, None, None, None, True, 0.1, 1e-5)  # missing arguments


def test_layout_of_is_the_librarys():
    # bnorm::layout_of, which the extension builds its views with and the package reads memory with.
    from bnorm import _arrays

    assert _bnorm.layout_of((2, 3, 4, 5), (60, 20, 5, 1)) == "channels_first"
    assert _bnorm.layout_of((2, 3, 4, 5), (60, 1, 15, 3)) == "channels_last"
    assert _bnorm.layout_of((2, 1, 4, 5), (20, 1, 5, 1)) == "channels_first"  # both: the same memory
    assert _bnorm.layout_of((0, 3, 4), (7, 7, 7)) == "channels_first"  # empty
    assert _bnorm.layout_of((4, 3), (1, 4)) is None
    assert _bnorm.layout_of((2, 3, 4, 5), (60, 20, 1, 4)) is None
    assert _arrays.layout_of((2, 3), None) is None  # strides that are not whole elements
    with pytest.raises(ValueError, match=r"bnorm::layout_of: strides: expected 3 values \(one per dim\), got 2"):
        _bnorm.layout_of((2, 3, 4), (12, 4))
    x = np.zeros((2, 3, 4, 5), np.float32)
    for a, want in ((x, "channels_first"), (x.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2), "channels_last"),
                    (x[:, :, ::2], None), (x.transpose(0, 1, 3, 2), None)):
        assert _arrays.layout_of(a.shape, _arrays.NumpyArrays.strides(a)) == want
        t = torch.from_numpy(a)
        assert _arrays.layout_of(tuple(t.shape), t.stride()) == want
