"""The functional API: torch.nn.functional.batch_norm's signature and rules on NumPy arrays and
torch tensors, backed by bnorm's kernels (bnorm._bnorm).

Checks come first and raise TypeError (a wrong kind of argument: not an array, wrong dtype, wrong
device, mixed NumPy/torch) or ValueError (a wrong value: sizes, eps, one value per channel), with
torch's wording where torch has one; nothing is written before they pass. Then the input's memory
decides the layout: dense channels-first (contiguous) and channels-last memory go to the kernels as
they are; any other strides are first copied into one of them.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _bnorm as _C
from ._arrays import TorchTensors, is_in_layout, kind_of, layout_of, preferred_copy_layout

__all__ = ["batch_norm", "batch_norm_backward", "batch_stats"]

# torch accepts eps = 0 in eval (it divides by sqrt(running_var)); the kernels want eps > 0, and
# the smallest double changes running_var + eps only where running_var is 0 or subnormal.
_SMALLEST_EPS = 5e-324


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
    shape = kind.shape(input)
    if len(shape) < 2:
        raise ValueError(
            f"{fn}: input must have at least 2 dimensions (N, C, ...), got {len(shape)} with shape "
            f"{kind.size_str(shape)}"
        )
    return kind


def _check_array(fn, kind, name, x, input=None, also_float64=False, vector=False):
    """x is an array of input's kind, usable (device, storage) and of input's dtype (vector=True:
    the dtype of input's per-channel vectors, float32 for a bfloat16 input; also_float64: or
    float64)."""
    if kind_of(x) is not kind:
        raise TypeError(f"{fn}: {name} must be a {kind.name} like input (or None), not {_type_name(x)}")
    problem = kind.problem(x)
    if problem:
        raise TypeError(f"{fn}: {name} {problem}")
    if input is None:
        if not kind.is_supported_dtype(x):
            raise TypeError(
                f"{fn}: {name} has dtype {kind.dtype_name(x)}, but bnorm supports {kind.supported} only"
            )
        return
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


def _check_vector(fn, kind, name, v, input, C, also_float64=False):
    if v is None:
        return
    _check_array(fn, kind, name, v, input, also_float64, vector=True)
    n = kind.numel(v)
    if n != C:
        raise ValueError(f"{fn}: {name} should contain {C} elements not {n}")


def _check_bool(fn, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, not {_type_name(value)}")


def _check_real(fn, name, value, hint=""):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a float, not {_type_name(value)}{hint}")


def _check_eps(fn, eps, training):
    # torch's rules (eps > 0 in training, eps >= 0 in eval), plus finiteness, which the kernels need.
    if math.isnan(eps) or math.isinf(eps):
        raise ValueError(f"{fn}: eps must be finite, got {eps} (bnorm's kernels need a finite eps)")
    if training and eps <= 0:
        raise ValueError(f"{fn}: batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"{fn}: batch_norm eps must be non-negative, but got {eps}")


def _values_per_channel(shape) -> int:
    m = shape[0]
    for d in shape[2:]:
        m *= d
    return m


def check_forward(fn, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """All of batch_norm's checks; returns the adapter of the arguments' kind."""
    kind = _input_kind(fn, input)
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
    shape = kind.shape(input)
    C = shape[1]
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_vector(fn, kind, name, v, input, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var must be defined in evaluation mode (training=False)")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v is not None and kind.requires_grad(v):
            raise ValueError(
                f"{fn}: {name} requires grad, but batch_norm is not differentiable with respect to the running "
                "statistics (torch refuses it too): pass a buffer or a detached tensor"
            )
        if v is not None and training and not kind.writable(v):
            raise ValueError(f"{fn}: {name} is read-only, but training=True updates it in place")
    _check_eps(fn, float(eps), bool(training))
    if training and _values_per_channel(shape) == 1:
        raise ValueError(
            f"{fn}: Expected more than 1 value per channel when training, got input size {kind.size_str(shape)}"
        )
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
    x = kind.for_kernel(input)
    shape, strides = kind.shape(x), kind.strides(x)
    layout = layout_of(shape, strides)
    if layout is None:
        layout = preferred_copy_layout(shape, strides)
        x = kind.copy_to(x, layout)
    return x, layout


def _update_running_stats(kind, running_mean, running_var, mean, invstd, momentum, eps, m):
    """The running update for a momentum outside [0, 1] (torch allows any; the kernels check the
    range): from the batch mean and 1/sqrt(var + eps) the kernels saved in float64."""
    mu = kind.as_numpy(mean).astype(np.float64)
    var = np.maximum(1.0 / np.square(kind.as_numpy(invstd).astype(np.float64)) - eps, 0.0) * (m / (m - 1))
    for dst, batch in ((running_mean, mu), (running_var, var)):
        view = kind.as_numpy(dst)
        view[...] = ((1.0 - momentum) * view.astype(np.float64).reshape(-1) + momentum * batch).reshape(view.shape)


def apply_forward(kind, input, running_mean, running_var, weight, bias, training, momentum, eps, keep=False):
    """Runs the forward (arguments already checked). Returns the output and, with keep=True, a
    Saved for backward."""
    training, momentum, eps = bool(training), float(momentum), float(eps)
    shape = kind.shape(input)
    C = shape[1]
    x, layout = _dense_input(kind, input)
    out = kind.empty(shape, x, layout)
    kernel_eps = eps if eps > 0 else _SMALLEST_EPS
    saved = Saved(x, layout, training, kernel_eps) if keep else None
    if kind.numel(x) == 0:  # torch returns an empty output and changes nothing
        return out, saved
    w = kind.contiguous_vector(weight) if weight is not None else None
    b = kind.contiguous_vector(bias) if bias is not None else None
    if training:
        update = running_mean is not None
        in_range = 0.0 <= momentum <= 1.0
        need_stats = keep or (update and not in_range)
        mean = kind.empty_vector(C, float64=True) if need_stats else None
        invstd = kind.empty_vector(C, float64=True) if need_stats else None
        rm = kind.contiguous_vector(running_mean) if update and in_range else None
        rv = kind.contiguous_vector(running_var) if update and in_range else None
        _C.forward(x, out, rm, rv, w, b, True, momentum if in_range else 0.0, kernel_eps, mean, invstd)
        if rm is not None:
            kind.write_back(running_mean, rm)
            kind.write_back(running_var, rv)
        elif update:
            _update_running_stats(kind, running_mean, running_var, mean, invstd, momentum, kernel_eps,
                                  _values_per_channel(shape))
        if keep:
            saved.mean, saved.invstd = mean, invstd
    else:
        rm, rv = kind.contiguous_vector(running_mean), kind.contiguous_vector(running_var)
        _C.forward_eval(x, out, rm, rv, w, b, kernel_eps)
        if keep:  # frozen now: a later training step may update the buffers before backward runs
            saved.running_mean, saved.running_var = kind.clone_vector(rm), kind.clone_vector(rv)
    return out, saved


def apply_backward(kind, grad_output, saved, weight, need_input=True, need_weight=True, need_bias=True):
    """The gradients (grad_input, grad_weight, grad_bias) of the forward that made `saved`; each is
    None when not needed."""
    x = saved.x
    shape = kind.shape(x)
    C = shape[1]
    dy = kind.for_kernel(grad_output)
    if not is_in_layout(shape, kind.strides(dy), saved.layout):
        dy = kind.copy_to(dy, saved.layout, count=False)
    grad_input = kind.empty(shape, x, saved.layout) if need_input else None
    grad_weight = kind.empty_vector(C, like=x) if need_weight else None
    grad_bias = kind.empty_vector(C, like=x) if need_bias else None
    if kind.numel(x) == 0:
        grad_weight = kind.zeros_vector(C, x) if need_weight else None
        grad_bias = kind.zeros_vector(C, x) if need_bias else None
        return grad_input, grad_weight, grad_bias
    w = kind.contiguous_vector(weight) if weight is not None else None
    _C.backward(dy, x, w, saved.running_mean, saved.running_var, saved.mean, saved.invstd, saved.training,
                saved.eps, grad_input, grad_weight, grad_bias)
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
    kind = check_forward(fn, input, running_mean, running_var, weight, bias, training, momentum, eps)
    if kind is TorchTensors:
        from . import torch as bnorm_torch

        return bnorm_torch._batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps)
    out, _ = apply_forward(kind, input, running_mean, running_var, weight, bias, training, momentum, eps)
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
    shape = kind.shape(input)
    if kind.shape(grad_output) != shape:
        raise ValueError(
            f"{fn}: grad_output must have input's shape {kind.size_str(shape)}, got "
            f"{kind.size_str(kind.shape(grad_output))}"
        )
    C = shape[1]
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_vector(fn, kind, name, v, input, C)
    for name, v in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        _check_vector(fn, kind, name, v, input, C, also_float64=True)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must either both be None or neither be None")
    if (save_mean is None) != (save_invstd is None):
        raise ValueError(f"{fn}: save_mean and save_invstd must either both be None or neither be None")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var must be defined in evaluation mode (training=False)")
    training, eps = bool(training), float(eps)
    _check_eps(fn, eps, training)

    x, layout = _dense_input(kind, input)
    saved = Saved(x, layout, training, eps if eps > 0 else _SMALLEST_EPS)
    if kind.numel(x) > 0:
        if training and save_mean is not None:
            saved.mean, saved.invstd = kind.contiguous_vector(save_mean), kind.contiguous_vector(save_invstd)
        elif training:
            mean, var = kind.empty_vector(C, float64=True), kind.empty_vector(C, float64=True)
            _C.batch_stats(x, mean, var)
            var_np = kind.as_numpy(var)
            var_np[...] = 1.0 / np.sqrt(var_np + eps)
            saved.mean, saved.invstd = mean, var
        else:
            saved.running_mean = kind.contiguous_vector(running_mean)
            saved.running_var = kind.contiguous_vector(running_var)
    return apply_backward(kind, grad_output, saved, weight, True, weight is not None, bias is not None)


def batch_stats(input):
    """Per-channel (mean, biased variance) of input (N, C, ...) over N and the spatial dims, as
    float64 vectors of input's kind: float64 input summed in double, float32 and bfloat16 input in
    float32 blocks merged in double (see docs/numerics.md for the bound)."""
    fn = "bnorm.batch_stats"
    kind = _input_kind(fn, input)
    shape = kind.shape(input)
    if _values_per_channel(shape) < 1 and shape[1] > 0:
        raise ValueError(f"{fn}: input must have at least 1 value per channel, got size {kind.size_str(shape)}")
    x, _ = _dense_input(kind, input)
    mean, var = kind.empty_vector(shape[1], float64=True), kind.empty_vector(shape[1], float64=True)
    _C.batch_stats(x, mean, var)
    return mean, var

