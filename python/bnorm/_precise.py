"""bnorm.torch.recompute_batch_norm_stats: exact population statistics for a model's BatchNorms
(precise BN; docs/running-statistics.md).

Each BatchNorm's input is accumulated batch by batch in bnorm's PopulationStats (C++: per-channel
count, mean and M2 of the float64 moments, merged with Chan's formula), so the result is the float64
two-pass mean and unbiased variance of that input over the whole data, whatever the batches are;
across processes the ranks' moments are merged in rank order, so every rank gets the same bits.
"""

from __future__ import annotations

import sys

import torch

from . import _bnorm as _C

_FN = "bnorm.torch.recompute_batch_norm_stats"
_BatchNormBase = torch.nn.modules.batchnorm._BatchNorm
_END = object()


class _Stop(Exception):
    """Raised by the BatchNorm being measured in exact_for_eval mode: the rest of the forward is not needed."""


def _default_forward(model, batch):
    return model(batch[0] if isinstance(batch, (list, tuple)) else batch)


def _moments_input(x):
    """The tensor as PopulationStats reads it: detached, dense in one of the two layouts, float16
    widened to float32 (exactly)."""
    x = x.detach()
    if x.dtype == torch.float16:
        x = x.float()
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))):
        x = x.contiguous()
    return x


class _Progress:
    """progress=True: tqdm's bar where it is installed, otherwise one line on stderr rewritten per batch."""

    def __init__(self, enabled, total, what):
        self.bar = None
        self.enabled, self.total, self.what, self.done = enabled, total, what, 0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc=what, unit="batch")

    def step(self):
        if not self.enabled:
            return
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            total = f"/{self.total}" if self.total is not None else ""
            sys.stderr.write(f"\r{self.what}: batch {self.done}{total}")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            sys.stderr.write("\n")


def _batch_source(batches, num_batches, exact, cache):
    """A function that returns a fresh iterator over the batches used (at most num_batches), each
    time it is called: the iterable itself where it can be read again, or a cache of the first pass."""
    if isinstance(batches, torch.Tensor) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{_FN}: batches: expected an iterable of batches (a list, a DataLoader), "
                        f"got {type(batches).__name__}")
    one_shot = iter(batches) is batches
    if exact and not cache:
        if one_shot:
            raise ValueError(f"{_FN}: batches: expected a re-iterable (a list, or a DataLoader without shuffling) "
                             f"in exact_for_eval mode, which reads the batches once per BatchNorm; got a one-shot "
                             f"{type(batches).__name__} (pass cache=True to keep its batches in memory)")
        loader = torch.utils.data.DataLoader
        if isinstance(batches, loader) and isinstance(batches.sampler, torch.utils.data.RandomSampler):
            raise ValueError(f"{_FN}: batches: expected the same batches on every pass in exact_for_eval mode, "
                             f"got a DataLoader with shuffle=True (use shuffle=False, or cache=True)")

    def limited(it):
        for i, b in enumerate(it):
            if num_batches is not None and i >= num_batches:
                return
            yield b

    if not (exact and cache):
        return lambda: limited(iter(batches))
    # The cache fills as far as the passes read: the first pass of exact_for_eval reads one batch only.
    kept, underlying = [], []

    def cached():
        if not underlying:
            underlying.append(limited(iter(batches)))
        i = 0
        while True:
            if i == len(kept):
                b = next(underlying[0], _END)
                if b is _END:
                    return
                kept.append(b)
            yield kept[i]
            i += 1

    return cached


def _group_for(model, process_group):
    """The process group whose ranks' statistics are merged: the argument, else the group of the
    model's SyncBatchNorms (torch's or bnorm's) when torch.distributed is running; None for one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(f"{_FN}: process_group: expected torch.distributed to be initialized, it is not")
        return None
    group = process_group
    if group is None:
        for m in model.modules():
            if isinstance(m, torch.nn.SyncBatchNorm) or type(m).__name__ == "SyncBatchNorm":
                group = getattr(m, "process_group", None) or dist.group.WORLD
                break
    if group is None or dist.get_world_size(group) <= 1:
        return None
    return group


def _agree(group, problem, payload):
    """Every rank's (problem, payload), gathered in rank order; when any rank has a problem, every
    rank raises the first failing rank's, with the same message."""
    if group is None:
        if problem is not None:
            raise problem
        return [payload]
    dist = torch.distributed
    R = dist.get_world_size(group)
    text = None if problem is None else f"{type(problem).__name__}: {problem}"
    gathered = [None] * R
    dist.all_gather_object(gathered, (text, payload), group=group)
    failed = [r for r, (t, _) in enumerate(gathered) if t is not None]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more rank(s) failed)" if len(failed) > 1 else ""
        error = ValueError(f"{_FN}: rank {first} of {R}: {gathered[first][0]}{more}")
        raise error from problem
    return [p for _, p in gathered]


class _Patched:
    """Replaces each BatchNorm's forward (and bnorm's fused entry, _bnorm_call) for the passes, and
    restores every training flag, every buffer of other modules and the BatchNorms' own methods."""

    def __init__(self, model, bns):
        self.model, self.bns = model, bns
        self.modes = [(m, m.training) for m in model.modules()]
        bn_buffers = {id(b) for m in bns for b in m.buffers(recurse=False)}
        self.buffers = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in bn_buffers]
        self.saved = []

    def install(self, normalize):
        """Every BatchNorm's forward becomes normalize(module, input) (the previous install undone)."""
        self.uninstall()
        for m in self.all_bns():
            own = {k: m.__dict__[k] for k in ("forward", "_bnorm_call") if k in m.__dict__}
            self.saved.append((m, own))

            def forward(input, m=m):
                return normalize(m, input)

            def fused(input, residual=None, relu=False, m=m):
                out = normalize(m, input)
                if residual is not None:
                    out = out + residual
                return torch.relu(out) if relu else out

            m.forward = forward
            if hasattr(type(m), "_bnorm_call"):
                m._bnorm_call = fused

    def all_bns(self):
        return [m for m in self.model.modules() if isinstance(m, _BatchNormBase)]

    def uninstall(self):
        for m, own in self.saved:
            for k in ("forward", "_bnorm_call"):
                m.__dict__.pop(k, None)
            m.__dict__.update(own)
        self.saved = []

    def restore(self):
        self.uninstall()
        for m, mode in self.modes:
            m.training = mode
        with torch.no_grad():
            for b, kept in self.buffers:
                b.copy_(kept)


def _batch_norm_train(m, x):
    """Training-mode normalization with the batch's statistics, touching no buffer and calling no
    collective (a rank may have fewer batches than another)."""
    return torch.nn.functional.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)


def recompute_batch_norm_stats(model: torch.nn.Module, batches, num_batches: int | None = None, *,
                               exact_for_eval: bool = False, cache: bool = False, progress: bool = False,
                               forward=None, process_group=None) -> None:
    """Sets the running statistics of every BatchNorm in `model` that tracks them (torch's
    BatchNorm1d/2d/3d and SyncBatchNorm, bnorm's modules, any torch.nn.modules.batchnorm._BatchNorm)
    to the population mean and unbiased variance of its input over `batches`.

    batches: an iterable of batches, each passed to the model as forward(model, batch) (default:
    model(batch[0]) for a list or tuple, model(batch) otherwise); num_batches: use at most this many.

    Default mode (PreciseBN): one pass over the batches with the model in training mode and every
    BatchNorm normalizing with its batch's statistics, so that each BatchNorm sees its input as it is
    in training under the current weights. exact_for_eval=True: layer by layer in the order of the
    forward, with the model in eval mode and the BatchNorms before the one being measured already
    normalizing with their new statistics, so that each one's statistics are exactly those of its
    input at eval time. That mode reads the batches once per BatchNorm (a forward up to that
    BatchNorm each time: about K/2 full passes for K BatchNorms), so `batches` must give the same
    batches every time (a list, a DataLoader without shuffling); a one-shot iterator is refused unless
    cache=True keeps the batches in memory.

    In a process group (process_group, or the group of the model's SyncBatchNorm when
    torch.distributed is initialized), every rank calls it with its own batches (any number, none
    included); the statistics are those of all ranks' data together, bitwise the same on every rank.

    What changes: each such BatchNorm's running_mean, running_var and num_batches_tracked (the number
    of batches the statistics were taken over, all ranks together, as torch.optim.swa_utils.update_bn
    leaves it); nothing else (training flags, momentum, other modules' buffers are as they were). On
    any error (an empty iterable, a model without BatchNorm running statistics, a batch the model
    refuses, a non-finite value in a BatchNorm's input) nothing changes, on every rank.
    progress=True shows a progress bar (tqdm's when installed).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_FN}: model: expected a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"{_FN}: num_batches: expected None or an int >= 1, got {num_batches!r}")
    named = [(name, m) for name, m in model.named_modules()
             if isinstance(m, _BatchNormBase) and m.track_running_stats and m.running_mean is not None]
    if not named:
        raise ValueError(f"{_FN}: model: expected at least one BatchNorm with running statistics "
                         f"(track_running_stats=True), got none in {type(model).__name__}")
    for name, m in named:
        if isinstance(m.running_mean, torch.nn.parameter.UninitializedBuffer):
            raise ValueError(f"{_FN}: {name}: expected an initialized BatchNorm, got an uninitialized "
                             f"{type(m).__name__} (run one forward first)")
    source = _batch_source(batches, num_batches, exact_for_eval, cache)
    forward = forward or _default_forward
    group = _group_for(model, process_group)
    bns = [m for _, m in named]
    patched = _Patched(model, bns)
    try:
        with torch.no_grad():
            if exact_for_eval:
                new, batches_seen = _exact_for_eval(model, named, source, forward, group, patched, progress)
            else:
                new, batches_seen = _one_pass(model, named, source, forward, group, patched, progress)
    finally:
        patched.restore()
    # Every statistic has been computed (and agreed on): now the buffers change, all of them.
    with torch.no_grad():
        for m, (mean, var) in zip(bns, new):
            if mean is None:
                continue
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(batches_seen)


def _finalized(name, m, parts):
    """The merged statistics of one BatchNorm from every rank's (count, mean, M2), in rank order, as
    the buffers' dtype (float32 work vectors for reduced-precision buffers); None for a BatchNorm
    that saw no values anywhere (its statistics stay)."""
    C = m.running_mean.numel()
    merged = _C.PopulationStats(C)
    for count, mean, m2 in parts:
        merged.merge(count, mean, m2)
    if merged.count == 0:
        return None, None
    work = m.running_mean.dtype if m.running_mean.dtype in (torch.float32, torch.float64) else torch.float32
    mean = torch.empty(C, dtype=work)
    var = torch.empty(C, dtype=work)
    try:
        merged.finalize(mean, var)
    except ValueError as e:
        raise ValueError(f"{_FN}: {name}: {e}") from None
    return mean, var


def _accumulate(name, acc, x, batch_index):
    try:
        acc.add(_moments_input(x))
    except (ValueError, TypeError) as e:
        raise type(e)(f"{_FN}: batch {batch_index}: {name}'s input: {e}; no running statistic was changed") from None


def _run(source, forward, model, progress, what, on_batch=None):
    """One pass: forward on every batch; returns the number of batches."""
    n = 0
    bar = _Progress(progress, None, what)
    try:
        for batch in source():
            if on_batch is not None:
                on_batch(n)
            try:
                forward(model, batch)
            except _Stop:
                pass
            n += 1
            bar.step()
    finally:
        bar.close()
    return n


def _one_pass(model, named, source, forward, group, patched, progress):
    accs = {id(m): (name, _C.PopulationStats(m.running_mean.numel())) for name, m in named}
    state = {"batch": 0}

    def normalize(m, x):
        if id(m) in accs:
            name, acc = accs[id(m)]
            _accumulate(name, acc, x, state["batch"])
        return _batch_norm_train(m, x)

    patched.install(normalize)
    model.train()
    problem, n = None, 0
    try:
        n = _run(source, forward, model, progress, _FN, lambda i: state.update(batch=i))
    except Exception as e:  # noqa: BLE001 - sent to every rank before any raises
        problem = e
    if group is None and problem is not None:
        _note(problem, state["batch"])
        raise problem
    payload = (n, [(acc.count, acc.mean(), acc.m2()) for _, acc in accs.values()])
    gathered = _agree(group, problem, payload)
    _check_same_model(gathered, [name for name, _ in named], group)
    total = sum(p[0] for p in gathered)
    if total == 0:
        raise ValueError(f"{_FN}: batches: expected at least one batch, got an empty iterable"
                         + (" on every rank" if group is not None else ""))
    new = [_finalized(name, m, [p[1][i] for p in gathered]) for i, (name, m) in enumerate(named)]
    return new, total


def _check_same_model(gathered, names, group):
    for r, (_, parts) in enumerate(gathered):
        if len(parts) != len(names):
            raise ValueError(f"{_FN}: rank {r}: model: expected {len(names)} BatchNorms with running statistics "
                             f"(rank 0's), got {len(parts)}")


def _note(e, batch_index):
    if hasattr(e, "add_note") and not str(e).startswith(_FN):
        e.add_note(f"{_FN}: raised at batch {batch_index}; no running statistic was changed")


def _exact_for_eval(model, named, source, forward, group, patched, progress):
    # The order of the forward, from one batch in eval with the old statistics (and how many calls
    # each BatchNorm gets: one whose output feeds itself again has no eval statistics of its own).
    calls = []

    def record(m, x):
        calls.append(id(m))
        return torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    patched.install(record)
    model.eval()
    problem = None
    try:
        for batch in source():
            forward(model, batch)
            break
    except Exception as e:  # noqa: BLE001
        problem = e
    patched.uninstall()
    if group is None and problem is not None:
        _note(problem, 0)
        raise problem
    by_id = {id(m): i for i, (_, m) in enumerate(named)}
    mine = [by_id[c] for c in calls if c in by_id]
    if group is None and not calls:
        raise ValueError(f"{_FN}: batches: expected at least one batch, got an empty iterable")
    for i, (name, _) in enumerate(named):
        if problem is None and mine.count(i) > 1:
            problem = ValueError(f"{_FN}: {name}: expected one call per forward in exact_for_eval mode, got "
                                 f"{mine.count(i)} (a BatchNorm applied more than once has no statistics of its "
                                 f"own at eval time; use the default mode)")
    order = list(dict.fromkeys(mine))  # first calls, in forward order
    # Every rank takes the order of the first rank that ran a batch (a rank may have none); ranks
    # exchange positions in `named`, not ids, which differ between processes.
    positions = _agree(group, problem, order)
    order = next((p for p in positions if p), order)
    if not order:
        raise ValueError(f"{_FN}: batches: expected at least one batch, got an empty iterable on every rank")
    new = [(None, None)] * len(named)
    done = {}
    total = 0
    for k in order:
        name, target = named[k]
        acc = _C.PopulationStats(target.running_mean.numel())
        state = {"batch": 0}

        def normalize(m, x, target=target, name=name, acc=acc, state=state):
            if m is target:
                _accumulate(name, acc, x, state["batch"])
                raise _Stop
            if id(m) in done:
                mean, var = done[id(m)]
                return torch.nn.functional.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)
            if m.training or m.running_mean is None:
                return _batch_norm_train(m, x)
            return torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0,
                                                  m.eps)

        patched.install(normalize)
        model.eval()
        problem, n = None, 0
        try:
            n = _run(source, forward, model, progress, f"{_FN} ({name})", lambda i, s=state: s.update(batch=i))
        except Exception as e:  # noqa: BLE001
            problem = e
        patched.uninstall()
        if group is None and problem is not None:
            _note(problem, state["batch"])
            raise problem
        gathered = _agree(group, problem, (n, (acc.count, acc.mean(), acc.m2())))
        total = sum(p[0] for p in gathered)
        if total == 0:
            raise ValueError(f"{_FN}: batches: expected at least one batch, got an empty iterable")
        mean, var = _finalized(name, target, [p[1] for p in gathered])
        new[k] = (mean, var)
        if mean is not None:
            done[id(target)] = (mean.to(target.running_mean.dtype), var.to(target.running_var.dtype))
    return new, total
