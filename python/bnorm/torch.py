"""bnorm.torch: bnorm's operators in torch's dispatcher, and drop-ins for torch.nn.BatchNorm1d/2d/3d.

    import torch, bnorm.torch
    bn = bnorm.torch.BatchNorm2d(64)                 # torch.nn.BatchNorm2d's arguments, parameters, buffers
    model = bnorm.torch.convert(torchvision_model)   # every torch BatchNorm*d swapped, state shared
    y = torch.ops.bnorm.batch_norm(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5)

Importing it loads the operators (libbnorm_torch_ops.so, built in C++ against the installed torch:
adapters/torch): torch.ops.bnorm.batch_norm, batch_norm_relu, batch_norm_add_relu and the
batch_norm_forward / batch_norm_eval / batch_norm_backward they are made of. They have CPU, Meta and Autograd kernels,
so they work with autograd, torch.compile(fullgraph=True), torch.export, torch.jit.trace, the meta
device and FakeTensor; their outputs are new tensors in the input's memory format.

The modules subclass torch.nn.BatchNorm1d/2d/3d (isinstance checks, state_dict keys and versions,
load_state_dict, reset_parameters, repr are torch's own) and replace only forward: torch's module
rules (momentum=None as a cumulative average over num_batches_tracked, batch statistics in eval when
track_running_stats=False) around one operator call. CPU tensors of float32, float64, bfloat16 and
float16 (computed in float32, like torch's CPU BN), with per-channel vectors of the input's dtype or
float32. The variants GhostBatchNorm1d/2d/3d and BatchRenorm1d/2d/3d (on the operators
ghost_batch_norm and batch_renorm), and to_ghost / to_renorm to swap a model's BatchNorms for them. During ONNX export (either exporter) they call torch's batch_norm, which the exporters
write as the standard BatchNormalization.
"""

from __future__ import annotations

from ._convert import convert, fold, fuse, to_ghost, to_renorm
from ._functional import batch_norm, batch_norm_backward, batch_stats
from ._modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
                       FrozenBatchNorm, FrozenBatchNorm2d, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d,
                       SyncBatchNorm)
from ._precise import recompute_batch_norm_stats

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_stats",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "to_ghost",
    "to_renorm",
    "convert",
    "fold",
    "fuse",
    "SyncBatchNorm",
    "recompute_batch_norm_stats",
]
