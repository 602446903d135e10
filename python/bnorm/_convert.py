"""bnorm.torch's model conversions: convert (torch's BatchNorms to bnorm's, optionally fused),
to_ghost, to_renorm, and the torch.fx passes fuse and fold."""

from __future__ import annotations

import logging

import torch

from . import _fold, _fuse
from ._modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
                       BnormForward, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, REPLACEMENTS)
from ._swap import convert_tree, replacement

_log = logging.getLogger("bnorm.torch")


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
            if isinstance(m, BnormForward):
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
    converted = convert_tree(module, lambda m: replacement(m, REPLACEMENTS.get(type(m))))
    if not fuse:
        return converted
    fused, report = _fuse.fuse(converted)
    for line in report:
        _log.info("bnorm.torch.convert(fuse=True): %s", line)
    return fused


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
        new = replacement(m, lambda num_features, **kw: cls(num_features, *extra.values(), **kw))
        for key in ("virtual_batch_size", "r_max", "d_max"):  # a variant's own, copied from another variant
            new.__dict__.pop(key, None)
        new.__dict__.update(extra)
        return new

    return convert_tree(module, replace)


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
    return _fuse.fuse(module)


def fold(module: torch.nn.Module, example_inputs=None, *, return_report: bool = False):
    """Folds the eval-mode BatchNorms of a copy of `module` into the Conv, ConvTranspose or Linear next
    to them, with torch.fx (bnorm/_fold.py, docs/folding.md); `module` itself is unchanged. Returns the
    folded copy (a torch.fx.GraphModule where it traced), and with return_report=True also the report:
    one line per BN, folded into which layer, or left (as a FrozenBatchNorm) and why. The report is
    logged to the logger "bnorm.torch" at INFO either way. example_inputs (a tensor or a tuple) are run
    once to learn the input ranks of Linear and BatchNorm1d, which decide whether they fold."""
    folded, report = _fold.fold(module, example_inputs)
    for line in report:
        _log.info("bnorm.torch.fold: %s", line)
    return (folded, report) if return_report else folded
