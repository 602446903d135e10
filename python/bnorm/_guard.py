"""The running-statistics rules of bnorm.torch's modules that torch's BatchNorm lacks
(docs/running-statistics.md): the non-finite guard's counter (skip_nonfinite: the operators decide,
in the C++ library) and one update per training step under torch.utils.checkpoint."""

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


def counter(module) -> torch.Tensor:
    """The module's guard counter, the operators' nonfinite_skips argument: a 0-dim int64 tensor that
    the operator increments when the library skipped the update (made on the first guarded call; a
    plain attribute, not a buffer, so not in the state_dict)."""
    c = module.__dict__.get("_nonfinite_counter")
    if c is None:
        c = module._nonfinite_counter = torch.zeros((), dtype=torch.int64)
        module._nonfinite_seen = 0
    return c


def skipped(module, c: torch.Tensor) -> bool:
    """After a guarded call: whether the operator skipped the update (its counter moved; one read of a
    0-dim tensor). Counts the skip in module.nonfinite_skipped and logs the module's first at WARNING.
    Under SyncBatchNorm the library decided on the global statistics, so every rank answers alike."""
    n = int(c)
    if n == module._nonfinite_seen:
        return False
    module._nonfinite_seen = n
    module.nonfinite_skipped = module.nonfinite_skipped + 1
    if module.nonfinite_skipped == 1:
        _log.warning("bnorm.torch.%s: a training batch would have made the running statistics non-finite (a NaN "
                     "or Inf in its statistics); its update was skipped and num_batches_tracked kept "
                     "(skip_nonfinite=True; counted in nonfinite_skipped, logged once per module)",
                     type(module).__name__)
    return True
