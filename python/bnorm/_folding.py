"""bnorm.fold_weights: the folding algebra of include/bnorm/fold.hpp (bnorm::fold_into_producer and
bnorm::fold_into_consumer) on NumPy arrays and CPU torch tensors. bnorm.torch.fold and bnorm.onnx.fold
compute their folded weights with it, so the arithmetic lives in the C++ library only (docs/folding.md).
"""

from __future__ import annotations

import numpy as np

from . import _bnorm

__all__ = ["fold_weights"]

_LAYOUTS = ("out_in", "in_out")


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _dense(name, x):
    """x as contiguous CPU memory the extension can view (a torch tensor stays a tensor)."""
    if x is None:
        return None
    if _is_torch(x):
        if x.device.type != "cpu":
            x = x.cpu()
        return x.detach().contiguous()
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    raise TypeError(f"bnorm.fold_weights: {name} must be a numpy.ndarray or a torch.Tensor (or None where optional), "
                    f"not {type(x).__name__}")


def _empty_like(x):
    if _is_torch(x):
        import torch

        return torch.empty(x.shape, dtype=x.dtype)
    return np.empty(x.shape, x.dtype)


def fold_weights(weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, eps=1e-5, *,
                 layout="out_in", groups=1, bn_before=False):
    """The weight and bias of a layer that has absorbed an eval-mode BatchNorm.

    weight: (C_out, C_in / groups, k...) for layout="out_in" (Conv, Linear, Gemm with transB=1) or
    (C_in, C_out / groups, k...) for layout="in_out" (ConvTranspose, Gemm with transB=0, MatMul).
    bias: length C_out, or None. The BN (running_mean, running_var, and its optional weight and bias)
    follows the layer (C_out channels), or with bn_before=True precedes it (C_in channels; exact only
    for a layer that does not pad its input). Returns (new_weight, new_bias): new arrays of weight's
    kind on the CPU, weight's dtype, and bias's dtype (weight's when bias is None), computed in float64
    and rounded once. Errors are the library's: ValueError or TypeError naming the argument.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"bnorm.fold_weights: layout: expected 'out_in' or 'in_out', got {layout!r}")
    weight = _dense("weight", weight)
    arrays = {name: _dense(name, x) for name, x in (("bias", bias), ("running_mean", running_mean),
                                                    ("running_var", running_var), ("bn_weight", bn_weight),
                                                    ("bn_bias", bn_bias))}
    if arrays["running_mean"] is None or arrays["running_var"] is None:
        raise ValueError("bnorm.fold_weights: running_mean and running_var: expected arrays, got None")
    if weight.ndim < 1:
        raise ValueError(f"bnorm.fold_weights: weight: expected an array of rank >= 2, got rank {weight.ndim}")
    c_out = weight.shape[0] if layout == "out_in" else (weight.shape[1] * groups if weight.ndim > 1 else 0)
    new_weight = _empty_like(weight)
    like = arrays["bias"] if arrays["bias"] is not None else weight
    if _is_torch(like):
        import torch

        new_bias = torch.empty((max(c_out, 0),), dtype=like.dtype)
    else:
        new_bias = np.empty((max(c_out, 0),), like.dtype)
    _bnorm.fold(weight, arrays["bias"], arrays["running_mean"], arrays["running_var"], arrays["bn_weight"],
                arrays["bn_bias"], float(eps), layout, int(groups), bool(bn_before), new_weight, new_bias)
    return new_weight, new_bias
