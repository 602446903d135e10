"""bnorm.torch: bnorm's operators in torch's dispatcher, and drop-ins for torch.nn.BatchNorm1d/2d/3d.

    import torch, bnorm.torch
    bn = bnorm.torch.BatchNorm2d(64)                 # torch.nn.BatchNorm2d's arguments, parameters, buffers
    model = bnorm.torch.convert(torchvision_model)   # every torch BatchNorm*d swapped, state shared
    y = torch.ops.bnorm.batch_norm(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5)

Importing it loads the operators (libbnorm_torch_ops.so, built in C++ against the installed torch:
adapters/torch/ops.cpp): torch.ops.bnorm.batch_norm, batch_norm_relu, batch_norm_add_relu and the
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

import logging
import os

import torch

from . import _functional as _F
from . import _guard
from ._functional import batch_norm, batch_norm_backward, batch_stats


def _load_operators():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libbnorm_torch_ops.so")
    if not os.path.exists(path):
        raise ImportError(
            "bnorm.torch: bnorm's torch operators (libbnorm_torch_ops.so) were not built with this package: "
            "build it where torch is installed (scripts/build_python, or pip install --no-build-isolation .)"
        )
    torch.ops.load_library(path)


_load_operators()


def _sync_threads():
    """The operators' library copy takes bnorm.set_num_threads's count (bnorm/__init__.py)."""
    from . import _threads_set

    if _threads_set is not None:
        torch.ops.bnorm._set_num_threads(_threads_set)


_sync_threads()

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

_ops = torch.ops.bnorm
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


def _exporting_onnx():
    """torch.onnx.is_in_onnx_export() without its per-call imports. Under torch.compile the public
    function, which dynamo knows (it does not trace the TorchScript exporter's property)."""
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    return _onnx_flags._is_onnx_exporting or _onnx_globals.in_onnx_export
_log = logging.getLogger("bnorm.torch")


def _batch_norm_vmap(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum, eps):
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
    input_dim, *vector_dims = in_dims
    x = input if input_dim is None else input.movedim(input_dim, 0)
    if not training and all(d is None for d in vector_dims):
        if input_dim is None:
            return _ops.batch_norm(input, *vectors, training, momentum, eps), None
        out = _ops.batch_norm(x.flatten(0, 1), *vectors, training, momentum, eps)
        return out.unflatten(0, x.shape[:2]), 0
    size = info.batch_size
    take = lambda t, d, i: t if t is None or d is None else t.select(d, i)
    outs = [_ops.batch_norm(take(input, input_dim, i), *(take(v, d, i) for v, d in zip(vectors, vector_dims)),
                            training, momentum, eps) for i in range(size)]
    return torch.stack(outs), 0


torch.library.register_vmap("bnorm::batch_norm", _batch_norm_vmap)


def _batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """bnorm.batch_norm on torch tensors that have passed _functional.check_forward: the operator."""
    return _ops.batch_norm(input, weight, bias, running_mean, running_var, bool(training), float(momentum),
                           float(eps))


def _torch_composition(input, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    """What the operators compute, in torch's own ops: used during ONNX export, whose exporters know
    torch's batch_norm (as BatchNormalization) and not bnorm's operators."""
    out = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _counting_and_momentum(module, training, track, momentum):
    """Whether a call of `module` counts a batch (num_batches_tracked), and the momentum it runs with:
    torch's rule for every BatchNorm-like module here (momentum None: a cumulative moving average)."""
    counting = training and track and module.num_batches_tracked is not None
    if momentum is None:  # a cumulative moving average, this batch included
        momentum = 1.0 / (float(module.num_batches_tracked) + 1.0) if counting else 0.0
    return counting, momentum


def _update_rules(module, training, running_mean, running_var, counting):
    """The running statistics a training call hands the operator, and whether it counts: none under
    torch.utils.checkpoint's recomputation (the step's first forward updated them); copies with
    skip_nonfinite, committed by _guard.commit_if_finite (`kept`: the buffers, else None)."""
    if not training or running_mean is None:
        return running_mean, running_var, counting, None
    if _guard.recomputing():
        return None, None, False, None
    if module.skip_nonfinite:
        return running_mean.clone(), running_var.clone(), counting, (running_mean, running_var)
    return running_mean, running_var, counting, None


class _BnormForward:
    """forward() for the subclasses of torch.nn.BatchNorm*d below: torch's module rules, bnorm's
    operators. num_batches_tracked and the running statistics change only once the operator has
    accepted the batch (torch counts it before it checks it), once per training step under
    torch.utils.checkpoint, and with skip_nonfinite=True not for a batch that would make them
    non-finite (counted in nonfinite_skipped; docs/running-statistics.md)."""

    skip_nonfinite = False  # class defaults: plain attributes, not in the state_dict
    nonfinite_skipped = 0

    def forward(self, input):
        return self._bnorm_call(input)

    def _bnorm_call(self, input, residual=None, relu=False):
        """relu(bn(input) + residual), with residual and relu optional, through one operator
        (bnorm.torch.convert(model, fuse=True) installs the fused calls). Written for a small
        per-call cost: every attribute is read once."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"bnorm.torch.{type(self).__name__}: input must be a torch.Tensor, not {type(input).__name__}")
        self._check_input_dim(input)
        training, track = self.training, self.track_running_stats
        running_mean, running_var, momentum = self.running_mean, self.running_var, self.momentum
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not track:  # the buffers are read in eval, and updated in training only when tracking
            running_mean = running_var = None
        counting, momentum = _counting_and_momentum(self, training, track, momentum)
        running_mean, running_var, counting, kept = _update_rules(self, training, running_mean, running_var, counting)
        args = (self.weight, self.bias, running_mean, running_var, use_batch_stats, momentum, self.eps)
        if _exporting_onnx():
            out = _torch_composition(input, *args, residual, relu)
        elif relu:
            out = (_ops.batch_norm_relu(input, *args) if residual is None
                   else _ops.batch_norm_add_relu(input, residual, *args))
        else:
            if residual is not None:  # a residual that cannot be added raises before anything changes
                torch.broadcast_shapes(input.shape, residual.shape)
            out = _ops.batch_norm(input, *args)
            if residual is not None:
                out = out + residual
        if kept is not None and not _guard.commit_if_finite(self, kept, running_mean, running_var):
            counting = False
        if counting:  # after the operator has accepted the batch
            self.num_batches_tracked.add_(1)
        return out



class BatchNorm1d(_BnormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnorm's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BnormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnorm's kernels: input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_BnormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnorm's kernels: input (N, C, D, H, W), contiguous or channels_last_3d."""


class SyncBatchNorm(_BnormForward, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm for CPU tensors, over torch.distributed (Gloo, or any backend whose
    allgather takes CPU tensors), which torch's own refuses ("expected input tensor to be on GPU").

    torch's constructor, state_dict and module rules. In training the batch statistics are those of
    the concatenation of every rank's batch in the process group (any number of samples per rank, 0
    included), merged exactly in rank order, so that every rank gets bitwise the same statistics,
    equal to one process's on the global batch (bnorm::sync_batch_norm: docs/distributed.md). The
    input gradient is the global-batch gradient of this rank's slice; the weight and bias gradients
    are this rank's part, which DDP's gradient averaging turns into torch's SyncBatchNorm semantics.
    In eval with running statistics, and whenever torch's would not synchronize (no process group,
    one rank), it is bnorm's BatchNorm with no communication.

    A bad input on one rank (channels, dtype, layout, a rank < 2 input) makes every rank raise the
    same error naming that rank, and nothing changes; a rank that died makes the others raise once
    the process group notices (at once for a closed connection, else after the group's timeout).
    Every rank of the group must call forward and backward together, as with torch's.

    It is not an instance of torch.nn.SyncBatchNorm, on purpose: DistributedDataParallel refuses
    those in CPU modules ("SyncBatchNorm layers only work with GPU modules"). Like torch's, it
    derives from torch.nn.modules.batchnorm._BatchNorm, with the same state_dict.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):  # torch.nn.SyncBatchNorm's rule (and message)
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"bnorm.torch.SyncBatchNorm: input must be a torch.Tensor, not {type(input).__name__}")
        training, track = self.training, self.track_running_stats
        use_batch_stats = training or (self.running_mean is None and self.running_var is None)
        group = None
        if use_batch_stats and training and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(group) <= 1:
                group = None
        if group is None or _exporting_onnx():  # torch's fallback: no synchronization needed
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return self._bnorm_call(input)
        # The input's own checks (rank, channels, dtype, layout) are the operator's: made on every
        # rank together, where a check here would raise on one rank and leave the others waiting.
        running_mean, running_var = (self.running_mean, self.running_var) if track else (None, None)
        counting, momentum = _counting_and_momentum(self, training, track, self.momentum)
        running_mean, running_var, counting, kept = _update_rules(self, training, running_mean, running_var, counting)
        out = _ops.sync_batch_norm(input, self.weight, self.bias, running_mean, running_var, momentum, self.eps,
                                   group.group_name)
        if kept is not None and not _guard.commit_if_finite(self, kept, running_mean, running_var):
            counting = False
        if counting:
            self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Swaps every torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm and bnorm BatchNorm*d in
        `module` (itself included) for bnorm.torch.SyncBatchNorm over `process_group` (None: the
        default group), sharing their parameters and buffers as convert() does. Returns `module`, or
        its replacement when it is a BatchNorm itself."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"bnorm.torch.SyncBatchNorm.convert_sync_batchnorm: expected a torch.nn.Module, "
                            f"not {type(module).__name__}")

        def replace(m):
            if type(m) not in _SYNC_SOURCES:
                return m
            new = _replacement(m, cls)
            new.process_group = process_group
            return new

        return _convert_tree(module, replace)


class FrozenBatchNorm(torch.nn.Module):
    """BatchNorm with fixed statistics and affine parameters, for inputs (N, C, ...) of any rank:
    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. Buffers only (weight, bias,
    running_mean, running_var), no num_batches_tracked; torchvision.ops.FrozenBatchNorm2d's semantics."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A BatchNorm's checkpoint loads: its num_batches_tracked is dropped (torchvision does the same).
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w, b = self.weight.reshape(shape), self.bias.reshape(shape)
        rv, rm = self.running_var.reshape(shape), self.running_mean.reshape(shape)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def __repr__(self):
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps})"

    @classmethod
    def of(cls, bn):
        """The frozen form of an eval-mode BatchNorm (copies of its statistics and parameters)."""
        frozen = cls(bn.num_features, eps=bn.eps)
        frozen = frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen


class FrozenBatchNorm2d(FrozenBatchNorm):
    """torchvision.ops.FrozenBatchNorm2d: FrozenBatchNorm for (N, C, H, W)."""


# ----------------------------------------------------------------------------------------------
# The variants (docs/semantics.md): Ghost Batch Normalization and Batch Renormalization, on the
# operators torch.ops.bnorm.ghost_batch_norm and batch_renorm (adapters/torch/ops.cpp). They derive
# from torch.nn.modules.batchnorm._BatchNorm: torch's parameters, buffers and state_dict, with
# their own attributes (virtual_batch_size; r_max, d_max) outside it.

def _check_unit_momentum(cls_name, momentum):
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bnorm.torch.{cls_name}: momentum: expected a float in [0, 1], got {momentum!r}")


class _GhostBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Ghost Batch Normalization: in training, the batch is split along N into virtual batches of
    virtual_batch_size samples (the last may be smaller), each normalized with its own statistics,
    and the running statistics are updated once per virtual batch, in order: torch's BatchNorm
    applied to each virtual batch in turn, num_batches_tracked counting each. Eval is BatchNorm.
    momentum is a float in [0, 1] (not None: the cumulative average would change per virtual batch)."""

    def __init__(self, num_features, virtual_batch_size, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"bnorm.torch.{type(self).__name__}: virtual_batch_size: expected an int >= 1, "
                             f"got {virtual_batch_size!r}")
        _check_unit_momentum(type(self).__name__, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self):
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"bnorm.torch.{type(self).__name__}: input must be a torch.Tensor, not {type(input).__name__}")
        self._check_input_dim(input)
        training, track = self.training, self.track_running_stats
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not track:
            running_mean = running_var = None
        vbs = self.virtual_batch_size
        if _exporting_onnx():
            return torch.cat([torch.nn.functional.batch_norm(part, running_mean, running_var, self.weight, self.bias,
                                                             use_batch_stats, self.momentum, self.eps)
                              for part in input.split(vbs)]) if use_batch_stats else \
                torch.nn.functional.batch_norm(input, running_mean, running_var, self.weight, self.bias, False,
                                               self.momentum, self.eps)
        out = _ops.ghost_batch_norm(input, self.weight, self.bias, running_mean, running_var, vbs, use_batch_stats,
                                    float(self.momentum), float(self.eps))
        if training and track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(-(-input.shape[0] // vbs))  # one per virtual batch
        return out


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost Batch Normalization for (N, C) or (N, C, L) inputs."""
    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost Batch Normalization for (N, C, H, W) inputs, contiguous or channels_last."""
    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost Batch Normalization for (N, C, D, H, W) inputs, contiguous or channels_last_3d."""
    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim


class _BatchRenorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch Renormalization (Ioffe 2017, Algorithm 1). In training, with sigma = sqrt(running_var +
    eps) from the running statistics before this step's update and sigma_B = sqrt(var_B + eps):
    r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - running_mean) / sigma, -d_max, d_max),
    constants in backward, y = weight * ((x - mu_B) / sigma_B * r + d) + bias; the running statistics
    are then updated as torch's BatchNorm's (momentum in [0, 1], or None: the cumulative average).
    Eval is BatchNorm. r_max and d_max are plain attributes, to change between steps (the paper's
    warm-up from 1 and 0). It always tracks running statistics (it reads them in training)."""

    def __init__(self, num_features, r_max=3.0, d_max=5.0, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(f"bnorm.torch.{name}: track_running_stats: expected True (Batch Renormalization reads "
                             "the running statistics in training), got False")
        if momentum is not None:
            _check_unit_momentum(name, momentum)
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.r_max, self.d_max = float(r_max), float(d_max)

    def extra_repr(self):
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def forward(self, input):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"bnorm.torch.{type(self).__name__}: input must be a torch.Tensor, not {type(input).__name__}")
        self._check_input_dim(input)
        training = self.training
        counting, momentum = _counting_and_momentum(self, training, True, self.momentum)  # always tracks
        if _exporting_onnx() and not training:
            return torch.nn.functional.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                                  False, momentum, self.eps)
        out = _ops.batch_renorm(input, self.weight, self.bias, self.running_mean, self.running_var, training,
                                float(self.r_max), float(self.d_max), float(momentum), float(self.eps))
        if counting:
            self.num_batches_tracked.add_(1)
        return out


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization for (N, C) or (N, C, L) inputs."""
    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization for (N, C, H, W) inputs, contiguous or channels_last."""
    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization for (N, C, D, H, W) inputs, contiguous or channels_last_3d."""
    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
# What convert_sync_batchnorm converts: torch's and bnorm's BatchNorm (exact classes), and torch's
# SyncBatchNorm.
_SYNC_SOURCES = {*_REPLACEMENTS, *_REPLACEMENTS.values(), torch.nn.SyncBatchNorm, SyncBatchNorm}


def _replacement(module, cls=None):
    cls = cls or _REPLACEMENTS.get(type(module))
    if cls is None:
        return module
    new = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
              track_running_stats=module.track_running_stats, device="meta")
    # The very same Parameter and buffer objects: optimizers and anything else holding them still
    # see the model's state, and the module's device and dtype are kept.
    new._parameters.clear()
    new._parameters.update(module._parameters)
    new._buffers.clear()
    new._buffers.update(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for key, value in module.__dict__.items():  # training, eps, momentum, ..., and user attributes
        if not key.startswith("_"):
            new.__dict__[key] = value
    return new


def convert(module: torch.nn.Module, fuse: bool = False, *, virtual_batch_size: int | None = None,
            renorm: tuple[float, float] | bool | None = None, skip_nonfinite: bool = False) -> torch.nn.Module:
    """Swaps every torch.nn.BatchNorm1d/2d/3d in `module` (itself included) for bnorm's.

    With virtual_batch_size=V they become Ghost BN over virtual batches of V samples (to_ghost), with
    renorm=(r_max, d_max) (or True: 3 and 5) Batch Renormalization (to_renorm); at most one of the two,
    and neither with fuse=True (the fused operators are plain BatchNorm's).

    The new modules share the old ones' parameters and buffers (the same tensors: state, device,
    dtype, requires_grad and optimizer references carry over) and training flag. Children are
    replaced in place; the return value is `module`, or its replacement when it is a BatchNorm
    itself. Only exact torch.nn.BatchNorm*d instances are converted: subclasses (which may change
    forward), SyncBatchNorm and uninitialized LazyBatchNorm*d are left alone. Hooks registered on a
    converted module are not carried over.

    fuse=True then rewrites BN -> ReLU and BN -> add -> ReLU (torchvision's BasicBlock and Bottleneck)
    into the fused operators, with torch.fx (bnorm.torch.fuse, which also returns its report: one
    line per BN, fused or not and why; convert logs it to the logger "bnorm.torch" at INFO). A traced
    module becomes a torch.fx.GraphModule with the same state_dict keys; anything it cannot trace is
    left unchanged, with a warning.

    skip_nonfinite=True sets that attribute on every bnorm BatchNorm1d/2d/3d and SyncBatchNorm of the
    result: a training batch that would make its running statistics non-finite updates neither them
    nor num_batches_tracked (the output is computed as always) and is counted in the module's
    nonfinite_skipped (docs/running-statistics.md). Not with virtual_batch_size or renorm.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"bnorm.torch.convert: expected a torch.nn.Module, not {type(module).__name__}")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"bnorm.torch.convert: skip_nonfinite: expected a bool, got {type(skip_nonfinite).__name__}")
    if skip_nonfinite:
        if (virtual_batch_size is not None) or (renorm is not None and renorm is not False):
            raise ValueError("bnorm.torch.convert: skip_nonfinite: expected False with virtual_batch_size or renorm "
                             "(Ghost BN and Batch Renorm have no guard), got True")
        converted = convert(module, fuse)
        for m in converted.modules():
            if isinstance(m, _BnormForward):
                m.skip_nonfinite = True
        return converted
    variant = [name for name, v in (("virtual_batch_size", virtual_batch_size), ("renorm", renorm))
               if v is not None and v is not False]
    if len(variant) > 1 or (variant and fuse):
        raise ValueError("bnorm.torch.convert: expected at most one of fuse, virtual_batch_size and renorm, got "
                         + ", ".join((["fuse"] if fuse else []) + variant))
    if virtual_batch_size is not None:
        return to_ghost(module, virtual_batch_size)  # checks every BN before it changes any
    if renorm is not None and renorm is not False:
        if renorm is True:
            renorm = (3.0, 5.0)
        if not (isinstance(renorm, (tuple, list)) and len(renorm) == 2):
            raise ValueError(f"bnorm.torch.convert: renorm: expected (r_max, d_max) or True, got {renorm!r}")
        return to_renorm(module, *renorm)
    converted = _convert_tree(module, _replacement)
    if not fuse:
        return converted
    from . import _fuse as fx_pass  # it builds on this module's classes

    fused, report = fx_pass.fuse(converted)
    for line in report:
        _log.info("bnorm.torch.convert(fuse=True): %s", line)
    return fused


def _convert_tree(module, replace):
    """`module` with replace(m) applied to it and to every module below it, children replaced in
    place; a module reached twice (shared) is replaced once, by the same new module."""
    done = {}

    def visit(m):
        if id(m) in done:
            return done[id(m)]
        new = replace(m)
        done[id(m)] = new
        for child_name, child in list(new._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            converted = visit(child)
            if converted is not child:
                new.add_module(child_name, converted)
        return new

    return visit(module)


# The rank of each BatchNorm class that to_ghost / to_renorm convert (torch's and bnorm's, exact
# classes, and each other's variants).
_VARIANT_RANKS = {
    **{cls: 1 for cls in (torch.nn.BatchNorm1d, BatchNorm1d, GhostBatchNorm1d, BatchRenorm1d)},
    **{cls: 2 for cls in (torch.nn.BatchNorm2d, BatchNorm2d, GhostBatchNorm2d, BatchRenorm2d)},
    **{cls: 3 for cls in (torch.nn.BatchNorm3d, BatchNorm3d, GhostBatchNorm3d, BatchRenorm3d)},
}


def _to_variant(fn, module, classes, check, extra):
    """Swaps every BatchNorm of _VARIANT_RANKS in `module` (itself included) for classes[rank],
    sharing parameters and buffers as convert() does, then sets `extra`'s attributes. check(m) names
    what a module cannot become; all are checked before anything changes."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"bnorm.torch.{fn}: expected a torch.nn.Module, not {type(module).__name__}")
    for name, m in module.named_modules(remove_duplicate=True):
        if type(m) in _VARIANT_RANKS and (problem := check(m)):
            raise ValueError(f"bnorm.torch.{fn}: {name or type(m).__name__}: {problem}")

    def replace(m):
        rank = _VARIANT_RANKS.get(type(m))
        if rank is None:
            return m
        cls = classes[rank]
        new = _replacement(m, lambda num_features, **kw: cls(num_features, *extra.values(), **kw))
        for key in ("virtual_batch_size", "r_max", "d_max"):  # a variant's own, copied from another variant
            new.__dict__.pop(key, None)
        new.__dict__.update(extra)
        return new

    return _convert_tree(module, replace)


def to_ghost(module: torch.nn.Module, virtual_batch_size: int) -> torch.nn.Module:
    """Every torch or bnorm BatchNorm1d/2d/3d (or Batch Renorm) in `module` becomes GhostBatchNorm1d/
    2d/3d with this virtual_batch_size, sharing its parameters and buffers (convert()'s rules).
    BatchNorms with momentum=None are refused (before anything changes). Returns `module`, or its
    replacement when it is a BatchNorm itself."""
    def check(m):
        if m.momentum is None:
            return "momentum: expected a float in [0, 1] (Ghost BN has no cumulative average), got None"
        return None

    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"bnorm.torch.to_ghost: virtual_batch_size: expected an int >= 1, got {virtual_batch_size!r}")
    return _to_variant("to_ghost", module, {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}, check,
                       {"virtual_batch_size": virtual_batch_size})


def to_renorm(module: torch.nn.Module, r_max: float = 3.0, d_max: float = 5.0) -> torch.nn.Module:
    """Every torch or bnorm BatchNorm1d/2d/3d (or Ghost BN) in `module` becomes BatchRenorm1d/2d/3d
    with these limits (change them later through each module's r_max / d_max), sharing its
    parameters and buffers. BatchNorms without running statistics are refused (before anything
    changes). Returns `module`, or its replacement when it is a BatchNorm itself."""
    def check(m):
        if not m.track_running_stats or m.running_mean is None:
            return ("track_running_stats: expected True (Batch Renormalization reads the running statistics), "
                    "got False")
        return None

    return _to_variant("to_renorm", module, {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}, check,
                       {"r_max": float(r_max), "d_max": float(d_max)})


def fuse(module: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """Rewrites a converted model's BN -> ReLU and BN -> add -> ReLU into the fused operators
    (torch.ops.bnorm.batch_norm_relu, batch_norm_add_relu) with torch.fx; returns the model and a
    report, one line per BN: fused, or not fused and why (bnorm/_fuse.py)."""
    from . import _fuse  # it builds on this module's classes

    return _fuse.fuse(module)


def recompute_batch_norm_stats(model: torch.nn.Module, batches, num_batches: int | None = None, *,
                               exact_for_eval: bool = False, cache: bool = False, progress: bool = False,
                               forward=None, process_group=None) -> None:
    """Sets every BatchNorm's running statistics to the exact population statistics of its input over
    `batches` (precise BN), in one pass (default) or layer by layer for eval (exact_for_eval=True);
    across the ranks of a process group when distributed. See bnorm/_precise.py and
    docs/running-statistics.md."""
    from . import _precise

    _precise.recompute_batch_norm_stats(model, batches, num_batches, exact_for_eval=exact_for_eval, cache=cache,
                                        progress=progress, forward=forward, process_group=process_group)


def fold(module: torch.nn.Module, example_inputs=None, *, return_report: bool = False):
    """Folds the eval-mode BatchNorms of a copy of `module` into the Conv, ConvTranspose or Linear next
    to them, with torch.fx (bnorm/_fold.py, docs/folding.md); `module` itself is unchanged. Returns the
    folded copy (a torch.fx.GraphModule where it traced), and with return_report=True also the report:
    one line per BN, folded into which layer, or left (as a FrozenBatchNorm) and why. The report is
    logged to the logger "bnorm.torch" at INFO either way. example_inputs (a tensor or a tuple) are run
    once to learn the input ranks of Linear and BatchNorm1d, which decide whether they fold."""
    from . import _fold  # it builds on this module's classes

    folded, report = _fold.fold(module, example_inputs)
    for line in report:
        _log.info("bnorm.torch.fold: %s", line)
    return (folded, report) if return_report else folded
