"""bnorm.torch: drop-ins for torch.nn.BatchNorm1d/2d/3d backed by bnorm's kernels.

    import torch, bnorm.torch
    bn = bnorm.torch.BatchNorm2d(64)                 # torch.nn.BatchNorm2d's arguments, parameters, buffers
    model = bnorm.torch.convert(torchvision_model)   # every torch BatchNorm*d swapped, state shared

The modules subclass torch.nn.BatchNorm1d/2d/3d (isinstance checks, state_dict keys and versions,
load_state_dict, reset_parameters, repr are torch's own) and replace only forward: the same rules
(momentum=None as a cumulative average over num_batches_tracked, batch statistics in eval when
track_running_stats=False) computed by bnorm's kernels, with gradients through BatchNormFunction.
CPU tensors of float32 and float64, and bfloat16 inputs with float32 parameters and buffers (torch's
mixed precision: bfloat16 output and input gradient, float32 running statistics and parameter
gradients); anything else raises TypeError.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _functional as _F
from ._arrays import TorchTensors as _T
from ._functional import batch_norm, batch_norm_backward, batch_stats

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_stats",
    "BatchNormFunction",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert",
]


class BatchNormFunction(torch.autograd.Function):
    """batch_norm as a torch.autograd.Function (first derivatives; double backward raises).

    apply(input, weight, bias, running_mean, running_var, training, momentum, eps), arguments
    already checked (bnorm.batch_norm checks them, then calls this when a gradient is needed).
    Forward keeps the input as the kernels saw it and the statistics it used: the batch mean and
    1/sqrt(var + eps) in float64 in training, copies of the running statistics in eval.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        out, saved = _F.apply_forward(_T, input, running_mean, running_var, weight, bias, training, momentum, eps,
                                      keep=True)
        # saved.x shares input's version counter (a detached view) unless it is a copy, so autograd
        # detects an in-place change of the input (or of weight) between forward and backward.
        ctx.save_for_backward(saved.x, weight, saved.mean, saved.invstd, saved.running_mean, saved.running_var)
        ctx.bnorm_layout, ctx.bnorm_training, ctx.bnorm_eps = saved.layout, saved.training, saved.eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight, mean, invstd, running_mean, running_var = ctx.saved_tensors
        saved = _F.Saved(x.detach(), ctx.bnorm_layout, ctx.bnorm_training, ctx.bnorm_eps)
        saved.mean, saved.invstd = mean, invstd
        saved.running_mean, saved.running_var = running_mean, running_var
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = _F.apply_backward(_T, grad_output, saved, weight, need_input, need_weight, need_bias)
        return (*grads, None, None, None, None, None)


def _batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """batch_norm on torch tensors that have passed _functional.check_forward (the library checks
    the rest in the kernels' call): through autograd when a gradient is wanted, straight to the
    kernels otherwise."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum, eps)
    out, _ = _F.apply_forward(_T, input, running_mean, running_var, weight, bias, training, momentum, eps)
    return out


class _BnormForward:
    """forward() for the subclasses of torch.nn.BatchNorm*d below: torch's module rules, bnorm's
    kernels. num_batches_tracked and the running statistics change only once every check (the
    binding's and the library's) has passed."""

    def forward(self, input):
        name = f"bnorm.torch.{type(self).__name__}"
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, not {type(input).__name__}")
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # The buffers are read in eval, and read and updated in training only when tracking.
        keep_stats = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_stats else None
        running_var = self.running_var if keep_stats else None
        momentum = 0.0 if self.momentum is None else self.momentum
        _F.check_forward(name, input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                         self.eps)
        counting = tracking and self.num_batches_tracked is not None
        if counting and self.momentum is None:  # cumulative moving average, this batch included
            momentum = 1.0 / (float(self.num_batches_tracked) + 1.0)
        out = _batch_norm_checked(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                                  self.eps)
        if counting:  # after the library's checks, which the kernels' call makes
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_BnormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnorm's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BnormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnorm's kernels: input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_BnormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnorm's kernels: input (N, C, D, H, W), contiguous or channels_last_3d."""


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _replacement(module):
    cls = _REPLACEMENTS.get(type(module))
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


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Swaps every torch.nn.BatchNorm1d/2d/3d in `module` (itself included) for bnorm's.

    The new modules share the old ones' parameters and buffers (the same tensors: state, device,
    dtype, requires_grad and optimizer references carry over) and training flag. Children are
    replaced in place; the return value is `module`, or its replacement when it is a BatchNorm
    itself. Only exact torch.nn.BatchNorm*d instances are converted: subclasses (which may change
    forward), SyncBatchNorm and uninitialized LazyBatchNorm*d are left alone. Hooks registered on a
    converted module are not carried over.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"bnorm.torch.convert: expected a torch.nn.Module, not {type(module).__name__}")
    done = {}

    def visit(m):
        if id(m) in done:
            return done[id(m)]
        new = _replacement(m)
        done[id(m)] = new
        for child_name, child in list(new._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            converted = visit(child)
            if converted is not child:
                new.add_module(child_name, converted)
        return new

    return visit(module)
