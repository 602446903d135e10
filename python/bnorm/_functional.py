"""The functional API: torch.nn.functional.batch_norm's signature and rules on NumPy arrays and
torch tensors, backed by bnorm's kernels (bnorm._bnorm).

The argument checks are the library's wherever it can make them: the kernels' call, under torch's
rules (bnorm::Policy::Torch: any momentum, eps >= 0 in eval, an empty training batch), checks shapes,
ranks, the lengths of the per-channel vectors, running statistics, eps, the values per channel, and
throws before it writes; its errors arrive as ValueError (TypeError for a dtype:
ErrorKind::Type) with its message, which names the argument, the expected and the actual value
(torch's own wording differs; bnorm's messages follow one grammar in every binding). What Python
checks first, before anything is allocated, is what only Python knows or what torch rules
differently from the library (each says which): the kind of an argument (not an array, NumPy and
torch mixed, device, dtype, bool and float arguments), running statistics that require grad or are
read-only. Running statistics,
num_batches_tracked and everything a backward keeps are written only after the kernels' call has
succeeded. Then the input's memory decides the layout (bnorm::layout_of): dense channels-first
(contiguous) and channels-last memory go to the kernels as they are; any other strides are first
copied into one of them.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _bnorm as _C
from ._arrays import CHANNELS_FIRST, TorchTensors, kind_of, layout_of, preferred_copy_layout

__all__ = ["batch_norm", "batch_norm_backward", "batch_stats"]

# ----------------------------------------------------------------------------------------------
# Checks


def _type_name(x) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _input_kind(fn, input):
    kind = kind_of(input)
    if kind is None:
        raise TypeError(f"{fn}: input must be a numpy.ndarray or a torch.Tensor, not {_type_name(input)}")
    _check_array(fn, kind, "input", input)
    return kind


def _check_array(fn, kind, name, x, input=None, also_float64=False, vector=False):
    """x is an array of input's kind, usable (device, storage) and of input's dtype (vector=True:
    the dtype of input's per-channel vectors, float32 for a bfloat16 input; also_float64: or
    float64). None passes (absent)."""
    if x is None:
        return
    if kind_of(x) is not kind:
        raise TypeError(f"{fn}: {name} must be a {kind.name} like input (or None), not {_type_name(x)}")
    problem = kind.problem(x)
    if problem:
        raise TypeError(f"{fn}: {name} {problem}")
    # A dtype bnorm has none for (float16, ints, non-native byte order) cannot reach the library.
    if input is None:
        if not kind.is_supported_dtype(x):
            raise TypeError(
                f"{fn}: {name} has dtype {kind.dtype_name(x)}, but bnorm supports {kind.supported} only"
            )
        return
    # The library checks dtype agreement too (a TypeError through ErrorKind::Type), but only once the
    # package has allocated the output and made dense copies; this check comes before any of that,
    # and says which mixed-precision rule applies.
    also = " (or float64)" if also_float64 else ""
    if not vector:
        if not kind.same_dtype(x, input):
            raise TypeError(f"{fn}: mixed dtypes: {name} has dtype {kind.dtype_name(x)} but input has "
                            f"{kind.dtype_name(input)}; {name} must have the input's dtype")
    elif not kind.vector_dtype_ok(x, input) and not (also_float64 and kind.is_float64(x)):
        if kind.is_reduced(input):
            rule = (f"the per-channel vectors of a {kind.dtype_name(input)} input must be "
                    f"{kind.vector_dtype_name(input)}{also} (torch's mixed-precision rule)")
        else:
            rule = f"per-channel vectors must have the input's dtype{also}"
        raise TypeError(
            f"{fn}: mixed dtypes: {name} has dtype {kind.dtype_name(x)} but input has {kind.dtype_name(input)}; {rule}"
        )


def _check_bool(fn, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, not {_type_name(value)}")


def _check_real(fn, name, value, hint=""):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a float, not {_type_name(value)}{hint}")


def _channels(shape) -> int:
    """C, or 0 below rank 2 (which the library refuses, naming the rank)."""
    return shape[1] if len(shape) >= 2 else 0


def _check_kinds(fn, kind, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """The arguments are of input's kind (or None), bool and floats."""
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if v is not None and kind_of(v) is not kind:
            raise TypeError(f"{fn}: {name} must be a {kind.name} like input (or None), not {_type_name(v)}")
    _check_bool(fn, "training", training)
    _check_real(
        fn,
        "momentum",
        momentum,
        " (momentum=None, the cumulative average, is an option of the modules: bnorm.torch.BatchNorm2d)"
        if momentum is None
        else "",
    )
    _check_real(fn, "eps", eps)


def check_forward(fn, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """batch_norm's checks that are not the library's (see the module's docstring), run before
    anything is allocated; returns the adapter of the arguments' kind. The library's run in
    apply_forward."""
    kind = _input_kind(fn, input)
    _check_kinds(fn, kind, input, running_mean, running_var, weight, bias, training, momentum, eps)
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_array(fn, kind, name, v, input, vector=True)
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        # torch's rule; the library's views carry no autograd.
        if v is not None and kind.requires_grad(v):
            raise ValueError(
                f"{fn}: {name} requires grad, but batch_norm is not differentiable with respect to the running "
                "statistics (torch refuses it too): pass a buffer or a detached tensor"
            )
        # A NumPy flag, which the library's views do not carry.
        if v is not None and training and not kind.writable(v):
            raise ValueError(f"{fn}: {name} is read-only, but training=True updates it in place")
    return kind


# ----------------------------------------------------------------------------------------------
# Running the kernels


class Saved:
    """What backward needs from a forward: the input as the kernels saw it, its layout, and the
    statistics used (batch mean and 1/std in float64 in training; copies of the running mean and
    variance in eval)."""

    __slots__ = ("x", "layout", "training", "mean", "invstd", "running_mean", "running_var", "eps")

    def __init__(self, x, layout, training, eps):
        self.x, self.layout, self.training, self.eps = x, layout, training, eps
        self.mean = self.invstd = self.running_mean = self.running_var = None


def _dense_input(kind, input):
    """The input as the kernels take it, and its layout as the library reads it (a copy of memory
    in neither layout is read again: channels-first when the copy is both)."""
    x = kind.for_kernel(input)
    shape = kind.shape(x)
    layout = layout_of(shape, kind.strides(x))
    if layout is None:
        x = kind.copy_to(x, preferred_copy_layout(shape, kind.strides(x)))
        layout = layout_of(shape, kind.strides(x))
    return x, layout


def _contiguous(kind, v):
    return None if v is None else kind.contiguous_vector(v)


def apply_forward(kind, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Runs the forward, whose call of the kernels makes the library's checks (check_forward has
    made the others) before it writes; what is written here comes after it. Returns the output."""
    training, momentum, eps = bool(training), float(momentum), float(eps)
    x, layout = _dense_input(kind, input)
    out = kind.empty(kind.shape(x), x, layout)
    w, b = _contiguous(kind, weight), _contiguous(kind, bias)
    if not training:
        _C.forward_eval(x, out, _contiguous(kind, running_mean), _contiguous(kind, running_var), w, b, eps)
        return out
    rm, rv = _contiguous(kind, running_mean), _contiguous(kind, running_var)
    _C.forward(x, out, rm, rv, w, b, True, momentum, eps, None, None)
    if rm is not None:
        kind.write_back(running_mean, rm)
        kind.write_back(running_var, rv)
    return out


def apply_backward(kind, grad_output, saved, weight, need_input=True, need_weight=True, need_bias=True):
    """The gradients (grad_input, grad_weight, grad_bias) of the forward that made `saved`; each is
    None when not needed. The library checks grad_output, weight and the statistics."""
    x = saved.x
    shape = kind.shape(x)
    C = _channels(shape)
    dy = kind.for_kernel(grad_output)
    if layout_of(kind.shape(dy), kind.strides(dy)) != saved.layout:
        # Another shape is the library's error; it is copied in a layout that any rank has.
        dy = kind.copy_to(dy, saved.layout if kind.shape(dy) == shape else CHANNELS_FIRST, count=False)
    grad_input = kind.empty(shape, x, saved.layout) if need_input else None
    grad_weight = kind.empty_vector(C, like=x) if need_weight else None
    grad_bias = kind.empty_vector(C, like=x) if need_bias else None
    _C.backward(dy, x, _contiguous(kind, weight), saved.running_mean, saved.running_var, saved.mean, saved.invstd,
                saved.training, saved.eps, grad_input, grad_weight, grad_bias)
    return grad_input, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# The public functions


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-05):
    """torch.nn.functional.batch_norm on NumPy arrays (float32, float64) or CPU torch tensors
    (float32, float64, bfloat16).

    Normalizes each channel (dim 1) of `input` (N, C, ...) with the batch statistics (training=True:
    mean and biased variance over N and the spatial dims) or with running_mean / running_var
    (training=False), then applies weight (gamma) and bias (beta) when given:

        y = (x - mean) / sqrt(var + eps) * weight + bias

    In training, running_mean and running_var (when given) are updated in place:
    running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance.

    A bfloat16 input is computed in float32 and its running_mean, running_var, weight and bias are
    float32 (torch's CPU mixed precision); the output is bfloat16.

    Returns a new array of input's kind, shape, dtype and layout (channels-first or channels-last).
    Torch tensors that require grad get a graph node (bnorm.torch's autograd Function). Raises
    TypeError for a wrong kind, dtype or device of argument and ValueError for wrong sizes or values.
    """
    fn = "bnorm.batch_norm"
    if kind_of(input) is TorchTensors:
        # torch.ops.bnorm.batch_norm makes every check of torch tensors (the library's and torch's
        # rules, float16 and reduced-precision vectors included); here only what its schema cannot
        # say: the kinds of the arguments.
        _check_kinds(fn, TorchTensors, input, running_mean, running_var, weight, bias, training, momentum, eps)
        from . import _ops  # here, not at the top: `import bnorm` imports no torch

        return _ops.batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps)
    kind = check_forward(fn, input, running_mean, running_var, weight, bias, training, momentum, eps)
    out = apply_forward(kind, input, running_mean, running_var, weight, bias, training, momentum, eps)
    return out


def batch_norm_backward(grad_output, input, running_mean, running_var, weight=None, bias=None, training=False,
                        momentum=0.1, eps=1e-05, *, save_mean=None, save_invstd=None):
    """The gradients of batch_norm: returns (grad_input, grad_weight, grad_bias).

    Pass grad_output (dL/dy, input's shape) and the arguments of the forward call (momentum is
    accepted and ignored, so that they can be passed unchanged). grad_weight is None when weight is
    None and grad_bias is None when bias is None.

    training=True differentiates through the batch statistics. They are recomputed from input
    (one more pass over it) unless save_mean and save_invstd (the batch mean and 1/sqrt(var + eps),
    input's dtype or float64, float32 or float64 for a bfloat16 input; bnorm.batch_stats gives mean
    and var) are passed. For a bfloat16 input grad_input is bfloat16 and grad_weight and grad_bias
    float32. training=False uses
    running_mean and running_var, which are then required. Works on NumPy arrays and CPU torch
    tensors alike (no autograd: for that, use the torch path of batch_norm).
    """
    fn = "bnorm.batch_norm_backward"
    kind = _input_kind(fn, input)
    _check_bool(fn, "training", training)
    _check_real(fn, "eps", eps)
    if grad_output is None:
        raise TypeError(f"{fn}: grad_output must be a {kind.name} like input, not None")
    _check_array(fn, kind, "grad_output", grad_output, input)
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_array(fn, kind, name, v, input, vector=True)
    for name, v in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        _check_array(fn, kind, name, v, input, also_float64=True, vector=True)
    training, eps = bool(training), float(eps)
    # Neither means "recompute them", which the library (it needs both in training) does not know.
    if (save_mean is None) != (save_invstd is None):
        raise ValueError(f"{fn}: save_mean and save_invstd must either both be None or neither be None")
    shape = kind.shape(input)
    C = _channels(shape)
    # The forward's arguments that the library's backward is not given (bias, whose presence only
    # asks for grad_bias; the running statistics in training) are checked here, with the forward's
    # rules; the library checks grad_output, weight, the statistics it uses and eps in eval.
    if training and (running_mean is None) != (running_var is None):
        # The library's wording for the same rule in forward.
        got, want = ("none", "a vector") if running_var is None else ("a vector", "none")
        raise ValueError(f"{fn}: running_var: expected {want} like running_mean, got {got}")
    unused = (("running_mean", running_mean), ("running_var", running_var)) if training else ()
    for name, v in (*unused, ("bias", bias)):
        if v is not None and len(shape) >= 2 and kind.numel(v) != C:
            raise ValueError(f"{fn}: {name}: expected {C} values (one per channel), got {kind.numel(v)}")
    if training and not eps > 0:
        # torch's forward rule, kept here because this binding uses eps to recompute 1/sqrt(var + eps)
        # (the library's backward does not use eps in training).
        raise ValueError(f"{fn}: batch_norm eps must be positive during training, but got {eps}")

    x, layout = _dense_input(kind, input)
    saved = Saved(x, layout, training, eps)
    if training and save_mean is not None:
        saved.mean, saved.invstd = kind.contiguous_vector(save_mean), kind.contiguous_vector(save_invstd)
    elif training and C > 0 and kind.numel(x) == 0:
        saved.mean, saved.invstd = kind.zeros_vector(C, x), kind.zeros_vector(C, x)  # of no values: never read
    elif training and len(shape) >= 2:
        mean, var = kind.empty_vector(C, float64=True), kind.empty_vector(C, float64=True)
        _C.batch_stats(x, mean, var)
        var_np = kind.as_numpy(var)
        var_np[...] = 1.0 / np.sqrt(var_np + eps)
        saved.mean, saved.invstd = mean, var
    elif not training:
        saved.running_mean, saved.running_var = _contiguous(kind, running_mean), _contiguous(kind, running_var)
    return apply_backward(kind, grad_output, saved, weight, True, weight is not None, bias is not None)


def batch_stats(input):
    """Per-channel (mean, biased variance) of input (N, C, ...) over N and the spatial dims, as
    float64 vectors of input's kind: float64 input summed in double, float32 and bfloat16 input in
    float32 blocks merged in double (see docs/numerics.md for the bound)."""
    fn = "bnorm.batch_stats"
    kind = _input_kind(fn, input)
    x, _ = _dense_input(kind, input)
    C = _channels(kind.shape(x))
    mean, var = kind.empty_vector(C, float64=True), kind.empty_vector(C, float64=True)
    _C.batch_stats(x, mean, var)  # the library checks the rank and the values per channel
    return mean, var

