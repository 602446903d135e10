"""bnorm's torch operators (libbnorm_torch_ops.so, built in C++ against the installed torch:
adapters/torch) loaded into torch's dispatcher as torch.ops.bnorm, with what every caller of them
shares: the thread count, the vmap rule, and the ONNX export check."""

from __future__ import annotations

import os

import torch

from . import _threads


def _load_operators():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libbnorm_torch_ops.so")
    if not os.path.exists(path):
        raise ImportError(
            "bnorm.torch: bnorm's torch operators (libbnorm_torch_ops.so) were not built with this package: "
            "build it where torch is installed (scripts/build_python, or pip install --no-build-isolation .)"
        )
    torch.ops.load_library(path)


_load_operators()
# The operators' copy of the library takes bnorm.set_num_threads's count.
_threads.follow(torch.ops.bnorm._set_num_threads)

ops = torch.ops.bnorm

# What torch.onnx.is_in_onnx_export() reads (both exporters), read here without its per-call imports.
try:
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _onnx_globals
except ImportError:  # another torch's layout: the public function, at its cost

    class _OnnxExport:
        @property
        def _is_onnx_exporting(self):
            return torch.onnx.is_in_onnx_export()

        in_onnx_export = False

    _onnx_flags = _onnx_globals = _OnnxExport()


def exporting_onnx():
    """torch.onnx.is_in_onnx_export() without its per-call imports. Under torch.compile the public
    function, which dynamo knows (it does not trace the TorchScript exporter's property)."""
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    return _onnx_flags._is_onnx_exporting or _onnx_globals.in_onnx_export


def _batch_norm_vmap(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum, eps,
                     nonfinite_skips=None):
    """torch.func.vmap of torch.ops.bnorm.batch_norm in eval: the examples of a batched input are
    independent there, so B batches of N become one of B*N; batched per-channel vectors run one call
    per example. In training each example has its own batch statistics (one call per example), as
    in torch; with running statistics it is refused, as torch refuses it: every example would update
    the same running_mean."""
    if training and (running_mean is not None or running_var is not None):
        raise ValueError(
            "bnorm::batch_norm: vmap: expected no running statistics in training (every vmapped example "
            "would update the same running_mean; torch refuses it too), got running_mean and running_var")
    vectors = (weight, bias, running_mean, running_var)
    input_dim, *vector_dims = in_dims[:5]  # nonfinite_skips matters only with running statistics in training
    x = input if input_dim is None else input.movedim(input_dim, 0)
    if not training and all(d is None for d in vector_dims):
        if input_dim is None:
            return ops.batch_norm(input, *vectors, training, momentum, eps), None
        out = ops.batch_norm(x.flatten(0, 1), *vectors, training, momentum, eps)
        return out.unflatten(0, x.shape[:2]), 0
    size = info.batch_size
    take = lambda t, d, i: t if t is None or d is None else t.select(d, i)
    outs = [ops.batch_norm(take(input, input_dim, i), *(take(v, d, i) for v, d in zip(vectors, vector_dims)),
                            training, momentum, eps) for i in range(size)]
    return torch.stack(outs), 0


torch.library.register_vmap("bnorm::batch_norm", _batch_norm_vmap)


def batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """bnorm.batch_norm on torch tensors that have passed _functional.check_forward: the operator."""
    return ops.batch_norm(input, weight, bias, running_mean, running_var, bool(training), float(momentum),
                           float(eps))


def torch_composition(input, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    """What the operators compute, in torch's own ops: used during ONNX export, whose exporters know
    torch's batch_norm (as BatchNormalization) and not bnorm's operators."""
    out = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out
