"""Swapping a model's modules for others that share their state (bnorm.torch.convert and the
variants' conversions, SyncBatchNorm.convert_sync_batchnorm)."""

from __future__ import annotations


def replacement(module, cls):
    """A new cls (None: `module` itself) holding the very same parameters, buffers and attributes."""
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


def convert_tree(module, replace):
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
