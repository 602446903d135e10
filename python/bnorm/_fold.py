"""A torch.fx pass that folds eval-mode BatchNorms into the Conv, ConvTranspose or Linear next to them.

    folded = bnorm.torch.fold(model, example_inputs=(x,))   # eval mode; `model` itself is not modified

The folded weights come from the C++ library (bnorm.fold_weights: bnorm::fold_into_producer and
fold_into_consumer, float64 rounded once to the weights' dtype). docs/folding.md has the rules and
the algebra; in short, a BatchNorm (torch's BatchNorm1d/2d/3d, SyncBatchNorm, bnorm.torch's, or a
frozen one: bnorm.torch.FrozenBatchNorm, torchvision.ops.FrozenBatchNorm2d) is folded

- into the layer that produces its input: Conv1d/2d/3d, ConvTranspose1d/2d/3d (any groups, stride,
  dilation, padding, with or without bias), and Linear where its input is (N, C) (never (N, C, L):
  Linear then mixes L while BatchNorm1d normalizes C), when that layer's output feeds only the BN;
- else into the layer that consumes its output: a Conv that does not pad its input, a Linear on (N, C),
  when the BN's output feeds only that layer.

Each layer is folded at most once per side, and only when the graph calls it once. A BatchNorm that
stays (its reason is in the report) and has running statistics becomes a frozen per-channel affine,
bnorm.torch.FrozenBatchNorm (FrozenBatchNorm2d for a BatchNorm2d): the same function in eval, with no
statistics to update (a frozen one stays as it is). The shapes the rules need (the input rank of each Linear and BatchNorm) come
from one eager run on example_inputs; without them a Linear + BatchNorm1d is left (and said so).

Tracing is torch.fx's symbolic tracer with BatchNorms as leaves (bnorm/_fuse.py's tracer). A module
that cannot be traced is not folded as a whole: a warning names it and its children are tried.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from ._folding import fold_weights
from ._fuse import Tracer, first_line, has_hooks, keep_state
from ._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, FrozenBatchNorm, FrozenBatchNorm2d

__all__ = ["fold"]

_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                BatchNorm1d, BatchNorm2d, BatchNorm3d)
try:  # torchvision's frozen BatchNorm (detection backbones), folded like ours
    from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozen
except ImportError:
    _TorchvisionFrozen = FrozenBatchNorm
_FROZEN = (FrozenBatchNorm, _TorchvisionFrozen)
_FOLDABLE = _BATCH_NORMS + _FROZEN  # what a BN node may call
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_TRANSPOSED = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


class _FoldTracer(Tracer):
    def is_leaf_module(self, m, module_qualified_name):
        return isinstance(m, _FOLDABLE) or super().is_leaf_module(m, module_qualified_name)


def _kind(module):
    t = type(module)
    if t in _CONVS:
        return "conv"
    if t in _TRANSPOSED:
        return "transposed"
    if t is torch.nn.Linear:
        return "linear"
    return None


def _unpadded(conv):
    return conv.padding == "valid" or (not isinstance(conv.padding, str) and all(p == 0 for p in conv.padding))


def _set_weights(layer, weight, bias):
    device, dtype = layer.weight.device, layer.weight.dtype
    layer.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype), layer.weight.requires_grad)
    bias_dtype = layer.bias.dtype if layer.bias is not None else dtype
    layer.bias = torch.nn.Parameter(bias.to(device=device, dtype=bias_dtype), layer.weight.requires_grad)


def _fold_into(layer, bn, bn_before):
    """Rewrites layer's weight and bias so that it computes bn(layer(x)) (bn_before: layer(bn(x)))."""
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    # float16 (which the library does not store) goes through float64, whose result is rounded once.
    if weight.dtype == torch.float16:
        weight = weight.double()
    if bias is not None and bias.dtype == torch.float16:
        bias = bias.double()
    new_weight, new_bias = fold_weights(
        weight, bias, bn.running_mean.detach(), bn.running_var.detach(),
        None if bn.weight is None else bn.weight.detach(), None if bn.bias is None else bn.bias.detach(), bn.eps,
        layout="in_out" if _kind(layer) == "transposed" else "out_in",
        groups=getattr(layer, "groups", 1), bn_before=bn_before)
    _set_weights(layer, new_weight, new_bias)


class _Folder:
    def __init__(self, ranks):
        self.ranks = ranks  # id(module) -> set of input ranks seen in the example run (None: no run)
        self.report = []
        self.seen = set()

    def rank_of(self, module):
        """The one input rank the module was called with, or why it is not known."""
        if self.ranks is None:
            return None, "its input's shape is unknown (pass example_inputs)"
        ranks = self.ranks.get(id(module), set())
        if len(ranks) != 1:
            return None, ("the example run did not call it" if not ranks
                          else f"the example run called it with inputs of ranks {sorted(ranks)}")
        return next(iter(ranks)), None

    def visit(self, module, path):
        if not any(isinstance(m, _FOLDABLE) for m in module.modules()):
            return module
        try:
            graph = _FoldTracer().trace(module)
            gm = fx.GraphModule(module, graph, type(module).__name__)
            keep_state(module, gm)
        except Exception as error:  # whatever the model's code raises on proxies
            warnings.warn(f"bnorm fold: {path or 'the model'} ({type(module).__name__}) cannot be traced by torch.fx "
                          f"({first_line(error)}); folding inside its children instead")
            for name, child in list(module._modules.items()):
                if child is not None:
                    module._modules[name] = self.visit(child, f"{path}.{name}" if path else name)
            return module
        self.rewrite(gm, f"{path}." if path else "")
        return gm

    @staticmethod
    def layer_at(gm, node, calls, prefix):
        """(layer, kind, name, why) for a call of a foldable layer, why: what keeps it from absorbing a
        BN ("is called 2 times", "has hooks") or None; None when node is no such call."""
        if not (isinstance(node, fx.Node) and node.op == "call_module"):
            return None
        layer = gm.get_submodule(node.target)
        kind = _kind(layer)
        if kind is None:
            return None
        name = f"{prefix}{node.target} ({type(layer).__name__})"
        why = None
        if calls[node.target] != 1:
            why = f"is called {calls[node.target]} times"
        elif has_hooks(layer):
            why = "has hooks"
        return layer, kind, name, why

    def producer_fold(self, gm, node, bn, calls, prefix):
        """The layer node to fold bn into as its producer, or why not (a str), or None."""
        source = node.args[0]
        found = self.layer_at(gm, source, calls, prefix)
        if found is None:
            return None
        layer, kind, name, why = found
        if len(source.users) != 1:
            return f"the output of {name} is used by {len(source.users)} nodes, not only by the BN"
        if why:
            return f"{name} {why}"
        if kind == "linear":
            rank, why = self.rank_of(layer)
            if rank is None:
                return f"{name}: {why}"
            if rank != 2:
                return (f"{name} gets inputs of rank {rank}: it mixes the last dim, the BN normalizes dim 1 "
                        f"(only Linear on (N, C) folds)")
        return source

    def consumer_fold(self, gm, node, bn, calls, prefix):
        """The layer node that consumes bn's output and can absorb it, or why not (a str), or None."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        found = self.layer_at(gm, user, calls, prefix)
        if found is None or tuple(user.args) != (node,) or user.kwargs:
            return None
        layer, kind, name, why = found
        if kind == "transposed":
            return f"it feeds {name}, which cannot absorb a BN in front of it exactly"
        if kind == "conv" and not _unpadded(layer):
            return f"it feeds {name}, which pads its input (the padding is not shifted by the BN)"
        if kind == "linear":
            rank, rank_why = self.rank_of(bn)
            if rank != 2:
                return f"it feeds {name}, {rank_why or f'on inputs of rank {rank}, not (N, C)'}"
        return f"it feeds {name}, which {why}" if why else user

    def rewrite(self, gm, prefix):
        graph = gm.graph
        calls = {}
        for n in graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        bns = [n for n in graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _FOLDABLE)]
        changed, folded = False, set()
        for node in bns:
            bn = gm.get_submodule(node.target)
            self.seen.add(id(bn))
            name = prefix + node.target
            why = None
            if bn.running_mean is None or bn.running_var is None:
                self.report.append(f"{name}: left: it has no running statistics, so eval uses batch statistics")
                continue
            if has_hooks(bn):
                why = "the BN has hooks"
            elif len(node.args) != 1 or node.kwargs:
                why = "the BN is called with other arguments than its input"
            elif not node.users:
                why = "its output is unused"
            if why is None:
                target = self.producer_fold(gm, node, bn, calls, prefix)
                side = "after"
                if not isinstance(target, fx.Node):
                    producer_why = target
                    target = self.consumer_fold(gm, node, bn, calls, prefix)
                    side = "before"
                    if not isinstance(target, fx.Node):
                        why = "; ".join(w for w in (producer_why, target) if w) or (
                            "no Conv, ConvTranspose or Linear produces its input or consumes its output")
            if why is None:
                layer = gm.get_submodule(target.target)
                _fold_into(layer, bn, bn_before=side == "before")
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                if side == "after":
                    calls[target.target] = float("inf")  # a layer absorbs one BN after it at most
                folded.add(node.target)
                self.report.append(f"{name}: folded into {prefix}{target.target} ({type(layer).__name__}), "
                                   f"which it {'follows' if side == 'after' else 'precedes'}")
            else:
                if isinstance(bn, _FROZEN):
                    self.report.append(f"{name}: left: {why}")
                    continue
                frozen_cls = FrozenBatchNorm2d if isinstance(bn, torch.nn.BatchNorm2d) else FrozenBatchNorm
                frozen = frozen_cls.of(bn)
                self.seen.add(id(frozen))
                _replace_submodule(gm, node.target, frozen)
                self.report.append(f"{name}: left as {frozen_cls.__name__}: {why}")
            changed = True
        if changed:
            graph.eliminate_dead_code()
            graph.lint()
            gm.recompile()
            used = {n.target for n in graph.nodes if n.op == "call_module"}
            for target in folded - used:  # the folded BNs go; any other module stays where it was
                gm.delete_submodule(target)

    def report_unreached(self, model):
        for path, m in model.named_modules():
            if isinstance(m, _FOLDABLE) and id(m) not in self.seen:
                self.report.append(f"{path}: left: no traced graph calls it")


def _replace_submodule(gm, target, module):
    parent_path, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    parent._modules[leaf] = module


def _input_ranks(model, example_inputs):
    """id(module) -> the set of input ranks of the Linear and BatchNorm modules in one eager run."""
    ranks, handles = {}, []

    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(id(module), set()).add(args[0].dim())

    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, *_FOLDABLE)):
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return ranks


def fold(model: torch.nn.Module, example_inputs=None) -> tuple[torch.nn.Module, list[str]]:
    """Folds the BatchNorms of a copy of `model` in eval mode (see the module docstring); returns the
    folded copy and the report, one line per BatchNorm: folded into which layer, or left and why."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"bnorm.torch.fold: model: expected a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    model = copy.deepcopy(model).eval()
    ranks = None if example_inputs is None else _input_ranks(model, example_inputs)
    folder = _Folder(ranks)
    with torch.no_grad():
        result = folder.visit(model, "")
    folder.report_unreached(result)
    return result, folder.report
