"""The modules of bnorm.torch: drop-ins for torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm, the
frozen BatchNorm, and the variants, each around one call of bnorm's operators (bnorm._ops)."""

from __future__ import annotations

import torch

from . import _guard
from ._ops import exporting_onnx, ops, torch_composition
from ._swap import convert_tree, replacement


def counting_and_momentum(module, training, track, momentum):
    """Whether a call of `module` counts a batch (num_batches_tracked), and the momentum it runs with:
    torch's rule for every BatchNorm-like module here (momentum None: a cumulative moving average)."""
    counting = training and track and module.num_batches_tracked is not None
    if momentum is None:  # a cumulative moving average, this batch included
        momentum = 1.0 / (float(module.num_batches_tracked) + 1.0) if counting else 0.0
    return counting, momentum


def update_rules(module, training, running_mean, running_var, counting):
    """The running statistics a training call hands the operator, whether it counts, and the guard's
    counter (the operators' nonfinite_skips, or None): no running statistics under
    torch.utils.checkpoint's recomputation (the step's first forward updated them); the counter with
    skip_nonfinite=True."""
    if not training or running_mean is None:
        return running_mean, running_var, counting, None
    if _guard.recomputing():
        return None, None, False, None
    return running_mean, running_var, counting, (_guard.counter(module) if module.skip_nonfinite else None)


class BnormForward:
    """forward() for the subclasses of torch.nn.BatchNorm*d below: torch's module rules, bnorm's
    operators. num_batches_tracked and the running statistics change only once the operator has
    accepted the batch (torch counts it before it checks it), once per training step under
    torch.utils.checkpoint, and with skip_nonfinite=True not for a batch that would make them
    non-finite (the operator's nonfinite_skips: the library decides; counted in nonfinite_skipped,
    docs/running-statistics.md)."""

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
        counting, momentum = counting_and_momentum(self, training, track, momentum)
        running_mean, running_var, counting, skips = update_rules(self, training, running_mean, running_var, counting)
        args = (self.weight, self.bias, running_mean, running_var, use_batch_stats, momentum, self.eps)
        if exporting_onnx():
            out = torch_composition(input, *args, residual, relu)
        elif relu:
            out = (ops.batch_norm_relu(input, *args, skips) if residual is None
                   else ops.batch_norm_add_relu(input, residual, *args, skips))
        else:
            if residual is not None:  # a residual that cannot be added raises before anything changes
                torch.broadcast_shapes(input.shape, residual.shape)
            out = ops.batch_norm(input, *args, skips)
            if residual is not None:
                out = out + residual
        if skips is not None and _guard.skipped(self, skips):
            counting = False
        if counting:  # after the operator has accepted the batch
            self.num_batches_tracked.add_(1)
        return out



class BatchNorm1d(BnormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnorm's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(BnormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnorm's kernels: input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(BnormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnorm's kernels: input (N, C, D, H, W), contiguous or channels_last_3d."""


class SyncBatchNorm(BnormForward, torch.nn.modules.batchnorm._BatchNorm):
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
        if group is None or exporting_onnx():  # torch's fallback: no synchronization needed
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return self._bnorm_call(input)
        # The input's own checks (rank, channels, dtype, layout) are the operator's: made on every
        # rank together, where a check here would raise on one rank and leave the others waiting.
        running_mean, running_var = (self.running_mean, self.running_var) if track else (None, None)
        counting, momentum = counting_and_momentum(self, training, track, self.momentum)
        running_mean, running_var, counting, skips = update_rules(self, training, running_mean, running_var, counting)
        out = ops.sync_batch_norm(input, self.weight, self.bias, running_mean, running_var, momentum, self.eps,
                                  group.group_name, skips)
        if skips is not None and _guard.skipped(self, skips):
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
            if type(m) not in SYNC_SOURCES:
                return m
            new = replacement(m, cls)
            new.process_group = process_group
            return new

        return convert_tree(module, replace)


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
# operators torch.ops.bnorm.ghost_batch_norm and batch_renorm (adapters/torch). They derive
# from torch.nn.modules.batchnorm._BatchNorm: torch's parameters, buffers and state_dict, with
# their own attributes (virtual_batch_size; r_max, d_max) outside it.

def _ranked(base, title):
    """The 1d, 2d and 3d classes of a variant: `base` with torch's BatchNorm*d input check."""
    ranks = (("1d", torch.nn.BatchNorm1d, "(N, C) or (N, C, L) inputs"),
             ("2d", torch.nn.BatchNorm2d, "(N, C, H, W) inputs, contiguous or channels_last"),
             ("3d", torch.nn.BatchNorm3d, "(N, C, D, H, W) inputs, contiguous or channels_last_3d"))
    name = base.__name__.lstrip("_")
    return tuple(type(name + suffix, (base,), {"__doc__": f"{title} for {shape}.", "__module__": __name__,
                                               "_check_input_dim": torch_cls._check_input_dim})
                 for suffix, torch_cls, shape in ranks)


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
        if exporting_onnx():
            return torch.cat([torch.nn.functional.batch_norm(part, running_mean, running_var, self.weight, self.bias,
                                                             use_batch_stats, self.momentum, self.eps)
                              for part in input.split(vbs)]) if use_batch_stats else \
                torch.nn.functional.batch_norm(input, running_mean, running_var, self.weight, self.bias, False,
                                               self.momentum, self.eps)
        out = ops.ghost_batch_norm(input, self.weight, self.bias, running_mean, running_var, vbs, use_batch_stats,
                                    float(self.momentum), float(self.eps))
        if training and track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(-(-input.shape[0] // vbs))  # one per virtual batch
        return out


GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d = _ranked(_GhostBatchNorm, "Ghost Batch Normalization")


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
        counting, momentum = counting_and_momentum(self, training, True, self.momentum)  # always tracks
        if exporting_onnx() and not training:
            return torch.nn.functional.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                                  False, momentum, self.eps)
        out = ops.batch_renorm(input, self.weight, self.bias, self.running_mean, self.running_var, training,
                                float(self.r_max), float(self.d_max), float(momentum), float(self.eps))
        if counting:
            self.num_batches_tracked.add_(1)
        return out


BatchRenorm1d, BatchRenorm2d, BatchRenorm3d = _ranked(_BatchRenorm, "Batch Renormalization")


REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
# What convert_sync_batchnorm converts: torch's and bnorm's BatchNorm (exact classes), and torch's
# SyncBatchNorm.
SYNC_SOURCES = {*REPLACEMENTS, *REPLACEMENTS.values(), torch.nn.SyncBatchNorm, SyncBatchNorm}
