"""The running-statistics rules of bnorm.torch's modules that torch's BatchNorm lacks
(docs/running-statistics.md): the non-finite guard (skip_nonfinite) and one update per training step
under torch.utils.checkpoint."""

from __future__ import annotations

import logging

import torch

_log = logging.getLogger("bnorm.torch")
_graph_task_id = torch._C._current_graph_task_id


def recomputing() -> bool:
    """Whether this training forward runs inside a backward pass: torch.utils.checkpoint's
    recomputation (reentrant: CheckpointFunction.backward; non-reentrant: the saved-tensor unpack
    hook), whose forward already updated the running statistics once. Under torch.compile, False
    (the compiled graph is traced once)."""
    return not torch.compiler.is_compiling() and _graph_task_id() != -1  # dynamo never sees the C call


def commit_if_finite(module, buffers, new_mean, new_var) -> bool:
    """skip_nonfinite: the operator updated copies of the running statistics (new_mean, new_var);
    copies them into the module's `buffers` when every value is finite and returns True; otherwise
    leaves the buffers as they were, counts the batch in module.nonfinite_skipped (an attribute, not
    in the state_dict), logs the first skip of the module at WARNING and returns False. Under
    SyncBatchNorm the updated values are bitwise the same on every rank, so every rank decides alike."""
    if bool(torch.isfinite(new_mean).all()) and bool(torch.isfinite(new_var).all()):
        buffers[0].copy_(new_mean)
        buffers[1].copy_(new_var)
        return True
    module.nonfinite_skipped = module.nonfinite_skipped + 1
    if module.nonfinite_skipped == 1:
        _log.warning("bnorm.torch.%s: a training batch would have made the running statistics non-finite (a NaN "
                     "or Inf in its statistics); its update was skipped and num_batches_tracked kept "
                     "(skip_nonfinite=True; counted in nonfinite_skipped, logged once per module)",
                     type(module).__name__)
    return False
