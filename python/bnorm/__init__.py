"""bnorm: Batch Normalization for the CPU with PyTorch's exact semantics, from Python.

    import numpy as np, bnorm
    x = np.random.rand(32, 64, 68, 68).astype(np.float32)
    y = bnorm.batch_norm(x, np.zeros(64, np.float32), np.ones(64, np.float32), training=True)

- bnorm.batch_norm: torch.nn.functional.batch_norm's signature and behaviour on NumPy arrays and
  CPU torch tensors (float32, float64; contiguous or channels-last memory, used without copies).
- bnorm.batch_norm_backward: its gradients (grad_input, grad_weight, grad_bias) for NumPy users.
- bnorm.batch_stats: per-channel mean and biased variance, as float64.
- bnorm.fold_weights: the weight and bias of a Conv/ConvTranspose/Linear that absorbed an eval BN.
- bnorm.onnx (needs onnx): fold(model) folds BatchNormalization into Conv, ConvTranspose, Gemm, MatMul.
- bnorm.torch (imported on first use; needs torch): BatchNorm1d/2d/3d modules that are drop-ins
  for torch.nn.BatchNorm*d, an autograd-aware batch_norm, and convert(model).

See docs/python.md.
"""

from __future__ import annotations

import importlib

from . import _bnorm
from ._folding import fold_weights
from ._functional import batch_norm, batch_norm_backward, batch_stats
from ._threads import num_threads, set_num_threads

__version__ = "0.1.0"
__all__ = ["batch_norm", "batch_norm_backward", "batch_stats", "fold_weights", "set_num_threads", "num_threads", "info", "torch"]


def info() -> str:
    """What bnorm detected here (CPU, instruction sets, caches, threads) and which kernel variant
    each operation and layout takes for a few shapes: the text of `bnorm info`."""
    return _bnorm.info()


def __getattr__(name):
    # bnorm.torch and bnorm.onnx are imported on first use, so that `import bnorm` imports neither torch nor onnx.
    if name in ("torch", "onnx"):  # bnorm.onnx needs the onnx package
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'bnorm' has no attribute {name!r}")
