"""A torch.fx pass that fuses BatchNorm -> ReLU and BatchNorm -> add -> ReLU into bnorm's fused operator.

    model, report = fuse(bnorm.torch.convert(torchvision_model))   # what convert(model, fuse=True) does

Only bnorm's BatchNorm modules (bnorm.torch.BatchNorm1d/2d/3d) are fused, and only where the result is
exactly the eager one: `relu(bn(x))` and `relu(bn(x) + t)` become one call of `bn._bnorm_call(x,
residual, relu=True)`, which applies the module's rules (training flag, momentum, num_batches_tracked)
like bn's forward. The report has one line per BatchNorm call: fused, or not fused and why.

Tracing. The model is traced with torch.fx's symbolic tracer, with bnorm's BatchNorm modules and the
fused modules below as leaves (torch.fx would otherwise trace into them: they are not in torch.nn).
Where a module cannot be traced (data-dependent control flow, say), a warning names it and its
children are tried, down to the modules that hold the BatchNorms (torchvision's BasicBlock and
Bottleneck trace even where the network around them does not); untraceable modules are kept as they
are, with their fused children installed in place. A traced module that has a fused site is replaced
by a torch.fx.GraphModule: the same submodules at the same paths, the same parameters and buffers (the
very tensors) in the same order, the same state_dict keys and training flags, but not the module's
class, methods or plain attributes, nor hooks on the modules fx traced through (torch.fx's rules).
A module without a fused site is returned unchanged. Tracing records `a += b` (and `-=`, `*=`, ...)
as the augmented assignment it is, where torch.fx records `a = a + b`, which does not modify a's
tensor as the eager code does: so the graph stays faithful, and the pass can tell which operand an
in-place add modifies.

State_dict keys: the fused modules, BatchNormReLU and BatchNormAddReLU, hold no state and no
reference to the BatchNorm: the graph passes the BatchNorm module itself, a get_attr of its own
qualified name, as their first argument. So the BatchNorm stays where it was and still owns its
parameters and buffers (state_dict keys, named_parameters, optimizer references, load_state_dict
and checkpoints of the unfused model all unchanged); the fused module is installed beside it as
`<name>_relu` or `<name>_add_relu` (layer1.0.bn2 -> layer1.0.bn2_add_relu) and adds no keys. Since the
graph names the BatchNorm, the BatchNorm cannot be orphaned: deepcopy, pickling, replacing
`model.layer1[0].bn2`, and fx passes that rebuild the GraphModule or delete unused submodules all
keep graph and module consistent, which a fused module holding a second, unregistered reference would
not. (A fused module holding the BatchNorm as a registered child would rename its keys to
`layer1.0.bn2.bn.weight`.) The ReLU modules that were fused stay registered, unused by the graph.

Exactness. A site is fused only when: the BatchNorm's output has exactly one user, the ReLU or the add;
for the add, its output has exactly one user, the ReLU, and it adds exactly two operands, the
BatchNorm's output and another tensor, without alpha or out; an in-place add (`out += t`,
`out.add_(t)`) modifies the BatchNorm's output (which nothing else sees), never the residual
(`t += bn(x)` is not fused: eager changes t); neither the BatchNorm nor the ReLU module has hooks
(the fused call does not run them). The fused call happens where the ReLU was, so the BatchNorm runs
later than in eager: nothing between the two may touch the same BatchNorm's module state or work in
place (which could change the BatchNorm's input or the residual before the fused call reads them).
ReLU means torch.nn.ReLU (in place or not), torch.relu, torch.relu_, F.relu, F.relu_, Tensor.relu and
Tensor.relu_, not ReLU6 or other activations. Shapes are unknown at trace time: the fused operator
checks at run time that the residual has the BatchNorm output's shape (a broadcasting add raises
there instead of broadcasting).
"""

from __future__ import annotations

import inspect
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

from ._modules import BnormForward

__all__ = ["BatchNormReLU", "BatchNormAddReLU", "fuse"]


class _FusedBase(torch.nn.Module):
    """Stateless: the graph passes the BatchNorm module, which stays at its own path (and keeps its
    state_dict keys); bn_name is that path, for repr only."""

    def __init__(self, bn_name: str = ""):
        super().__init__()
        self.bn_name = bn_name

    def extra_repr(self):
        return f"bn={self.bn_name}"


class BatchNormReLU(_FusedBase):
    """relu(bn(input)) in one fused call."""

    def forward(self, bn, input):
        return bn._bnorm_call(input, relu=True)


class BatchNormAddReLU(_FusedBase):
    """relu(bn(input) + residual) in one fused call."""

    def forward(self, bn, input, residual):
        return bn._bnorm_call(input, residual=residual, relu=True)


def _augmented_assignment(name, symbol):
    """`a op= b` as a function, as Python evaluates it: a tensor changes in place, an int or a tuple
    does not (a new value is returned). Not operator.iadd and co. themselves: for those, fx's code
    generation emits `a += b`, which rebinds the name of a's node for every later use of it."""
    op = getattr(operator, name)

    def assign(a, b):
        return op(a, b)

    assign.__name__ = assign.__qualname__ = f"_{name}"
    assign.symbol = symbol
    globals()[assign.__name__] = assign  # importable by name: GraphModule's pickling imports it
    return assign


_AUGMENTED = {name: _augmented_assignment(name, symbol) for name, symbol in {
    "iadd": "+=", "isub": "-=", "imul": "*=", "itruediv": "/=", "ifloordiv": "//=", "imod": "%=",
    "ipow": "**=", "imatmul": "@=", "iand": "&=", "ior": "|=", "ixor": "^=", "ilshift": "<<=",
    "irshift": ">>=",
}.items()}


class _Proxy(fx.Proxy):
    """A proxy that records `a += b` (and the other augmented assignments) as what they are.

    fx.Proxy has no __iadd__, so Python falls back to __add__ and the graph computes a new tensor where
    eager modifies a's: `out += identity` would not modify out, and `identity += out` not identity.
    Recording the augmented assignment keeps the generated code faithful and tells the pass which
    operand an add modifies."""


def _proxy_method(assign):
    def method(self, other):
        return self.tracer.create_proxy("call_function", assign, (self, other), {})

    method.__name__ = f"__{assign.__name__[1:]}__"
    return method


for _assign in _AUGMENTED.values():
    setattr(_Proxy, f"__{_assign.__name__[1:]}__", _proxy_method(_assign))
del _assign

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RELU_METHODS = {"relu", "relu_"}
# operator.iadd for graphs that come with it (torch.fx's own tracer does not record it).
_ADD_FUNCTIONS = {operator.add, operator.iadd, _AUGMENTED["iadd"], torch.add, torch.Tensor.add, torch.Tensor.add_}
_ADD_METHODS = {"add", "add_"}
_IN_PLACE_ADDS = {operator.iadd, _AUGMENTED["iadd"], torch.Tensor.add_, "add_"}
_IN_PLACE_OPERATORS = {getattr(operator, name) for name in _AUGMENTED} | set(_AUGMENTED.values()) | {operator.setitem}
# Results that are certainly not tensors, so not a residual (x.size(), x.shape[0], ...).
_NON_TENSOR_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "item", "tolist", "stride", "element_size"}
_NON_TENSOR_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}


class Tracer(fx.Tracer):
    """torch.fx's symbolic tracer with bnorm's BatchNorms and the fused modules as leaves."""

    def is_leaf_module(self, m, module_qualified_name):
        return isinstance(m, (BnormForward, _FusedBase)) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node):
        return _Proxy(node, self)


def has_hooks(module):
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _function_name(f):
    module = getattr(f, "__module__", None) or ""
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or repr(f)
    if module == "_operator":
        module = "operator"
    return f"{module}.{name}" if module else name


def _describe(node, gm, prefix):
    """A node as the report names it: `features.0.2 (ReLU6)`, `torch.relu`, `.add_()`, `+=`."""
    if node.op == "call_module":
        return f"{prefix}{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "symbol", None) or _function_name(node.target)
    if node.op == "output":
        return "the output"
    return f"{node.op} {node.target}"


def _relu_input(node, gm):
    """The operand of node when node is exactly a ReLU (in place or not), else None."""
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if node.op == "call_module":
        if type(gm.get_submodule(node.target)) is not torch.nn.ReLU:  # a subclass may change forward
            return None
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        if node.target is F.relu:  # relu(input, inplace=False): in place or not, the value is the same
            if len(args) == 2 and isinstance(args[1], bool):
                args = args[:1]
            if isinstance(kwargs.get("inplace", False), bool):
                kwargs.pop("inplace", None)
    elif not (node.op == "call_method" and node.target in _RELU_METHODS):
        return None
    if not args and "input" in kwargs:
        args = (kwargs.pop("input"),)
    if len(args) != 1 or kwargs:
        return None
    return args[0]


def _is_add(node):
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def _may_be_tensor(value):
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target in _NON_TENSOR_METHODS:
        return False
    if value.op == "call_function":
        if value.target is len:
            return False
        if value.target is getattr and len(value.args) == 2 and value.args[1] in _NON_TENSOR_ATTRIBUTES:
            return False
        if value.target is operator.getitem and not _may_be_tensor(value.args[0]):  # x.shape[0]
            return False
    return True


def _in_place(node, gm):
    """Whether node may modify a tensor in place (conservatively: by the usual naming conventions)."""
    if "out" in node.kwargs or node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    if node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("__")):
        return True
    try:  # a positional inplace argument, as in F.relu(x, True)
        return inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("inplace") is True
    except (TypeError, ValueError):
        return False


def _interference(node, bn_target, gm):
    """Why moving the call of the BatchNorm at bn_target past node could change a result, or None."""
    if node.op in ("call_module", "get_attr"):
        target = node.target
        if target == bn_target or target.startswith(bn_target + ".") or bn_target.startswith(target + "."):
            return "uses the same BatchNorm's module state"
    if _in_place(node, gm):
        return "may modify a tensor in place"
    return None


class _Site:
    """A fusable BatchNorm call: bn -> [add] -> relu. The operands are read from the nodes when the site
    is fused, since fusing an earlier site replaces nodes that this one may use (its ReLU's output as
    the residual, say)."""

    def __init__(self, bn, relu, add=None):
        self.bn, self.relu, self.add = bn, relu, add

    def operands(self):
        """(input, residual) for the fused call; residual None without an add."""
        input = self.bn.args[0] if self.bn.args else self.bn.kwargs["input"]
        if self.add is None:
            return input, None
        left, right = self.add.args
        return input, right if left is self.bn else left


def _match(bn_node, gm, prefix):
    """A _Site for the BatchNorm call bn_node, or why it cannot be fused."""
    def describe(n):
        return _describe(n, gm, prefix)

    if has_hooks(gm.get_submodule(bn_node.target)):
        return "the BatchNorm has hooks, which the fused call would not run"
    args, kwargs = tuple(bn_node.args), dict(bn_node.kwargs)
    if not args and "input" in kwargs:
        args = (kwargs.pop("input"),)
    if len(args) != 1 or kwargs:
        return "the BatchNorm is called with other arguments than its input"
    users = list(bn_node.users)
    if not users:
        return "its output is unused"
    if len(users) > 1:
        return f"its output is used by {len(users)} nodes ({', '.join(describe(u) for u in users)})"
    user = users[0]
    add = None
    if _is_add(user):
        if len(user.args) != 2 or user.kwargs:
            return f"it goes to {describe(user)} with other arguments than two operands (alpha, out, ...)"
        left, right = user.args
        if left is bn_node and right is bn_node:
            return f"it is added to itself ({describe(user)})"
        if user.target in _IN_PLACE_ADDS and left is not bn_node:
            return f"{describe(user)} adds it into the other operand in place, which a fused call would not modify"
        residual = right if left is bn_node else left
        if not _may_be_tensor(residual):
            return f"{describe(user)} adds it to something that is not a tensor"
        add, users = user, list(user.users)
        if len(users) != 1:
            return f"the output of {describe(add)} is used by {len(users)} nodes, not only by a ReLU"
        relu = users[0]
        if _relu_input(relu, gm) is not add:
            return f"{describe(add)} is followed by {describe(relu)}, not by ReLU"
    else:
        relu = user
        if _relu_input(relu, gm) is not bn_node:
            return f"it is followed by {describe(relu)}, not by ReLU or an add and ReLU"
    if relu.op == "call_module" and has_hooks(gm.get_submodule(relu.target)):
        return f"{describe(relu)} has hooks, which the fused call would not run"
    node = bn_node.next
    while node is not relu:
        why = None if node is add else _interference(node, bn_node.target, gm)
        if why:
            return f"{describe(node)}, between it and the ReLU, {why}"
        node = node.next
    return _Site(bn_node, relu, add)


def _install(gm, bn_target, module, suffix, original_ids):
    """Adds module beside the BatchNorm at bn_target, right after it; returns its qualified name."""
    parent_path, _, leaf = bn_target.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if id(parent) in original_ids:  # never modify a module of the model that was passed in
        parent_path, parent, leaf = "", gm, bn_target.replace(".", "_")
    name, n = leaf + suffix, 1
    while hasattr(parent, name):
        name, n = f"{leaf}{suffix}_{n}", n + 1
    parent.add_module(name, module)
    keys = list(parent._modules)
    if leaf in keys:  # move the children between the BatchNorm and the new module behind it
        for key in keys[keys.index(leaf) + 1:-1]:
            parent._modules[key] = parent._modules.pop(key)
    return f"{parent_path}.{name}" if parent_path else name


def _reorder(d, order):
    """d's items in the order of the keys in order, then the others as they were."""
    items = [(k, d[k]) for k in order if k in d] + [(k, v) for k, v in d.items() if k not in order]
    d.clear()
    d.update(items)


def keep_state(orig, new):
    """Makes the GraphModule container `new` hold what `orig` held, as `orig` held it.

    torch.fx's GraphModule copies only what the graph uses: it drops unused submodules, parameters
    and buffers, registers used buffers as persistent (and trace-time tensor constants as buffers),
    creates plain containers with training=True, and orders everything by first use. This restores
    the originals' state at the original paths, persistence, order and training flags."""
    new.training = orig.training
    for name, p in orig._parameters.items():
        if name not in new._parameters:
            new.register_parameter(name, p)
    for name, b in orig._buffers.items():
        if name not in new._buffers:
            new.register_buffer(name, b)
    # Persistent exactly when the original is: constants of the traced code are not state.
    new._non_persistent_buffers_set = {
        name for name in new._buffers if name not in orig._buffers or name in orig._non_persistent_buffers_set}
    for name, child in orig._modules.items():
        if name not in new._modules:  # unused in forward (or None): the original, as it is
            new._modules[name] = child
        elif new._modules[name] is not child and child is not None:  # a container fx traced through
            keep_state(child, new._modules[name])
    _reorder(new._parameters, list(orig._parameters))
    _reorder(new._buffers, list(orig._buffers))
    _reorder(new._modules, list(orig._modules))


def first_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class _Fuser:
    def __init__(self, model):
        self.original_ids = {id(m) for m in model.modules()}
        self.report = []
        self.seen = set()  # ids of the BatchNorms a traced graph calls or passes to a fused module
        self.untraced = {}  # path -> class name of the modules left unfused as a whole
        self.done = {}  # id -> replacement, for modules registered at several paths

    def visit(self, module, path):
        if id(module) in self.done:
            return self.done[id(module)]
        result = module
        if any(isinstance(m, BnormForward) for m in module.modules() if m is not module):
            result = self.fuse_module(module, path)
        self.done[id(module)] = result
        return result

    def fuse_module(self, module, path):
        try:
            graph = Tracer().trace(module)
        except Exception as error:  # whatever the model's code raises on proxies
            return self.fuse_children(module, path, f"torch.fx cannot trace it ({first_line(error)})")
        try:
            gm = fx.GraphModule(module, graph, type(module).__name__)
            keep_state(module, gm)
        except Exception as error:  # a name torch.fx's GraphModule uses for itself, say (`code`, `graph`)
            why = f"torch.fx cannot build a GraphModule of it ({first_line(error)})"
            return self.fuse_children(module, path, why)
        if list(gm.state_dict()) != list(module.state_dict()):  # state_dict hooks, for one
            return self.fuse_children(module, path, "as a torch.fx GraphModule its state_dict keys would change")
        fused = self.rewrite(gm, f"{path}." if path else "")
        return gm if fused else module

    def fuse_children(self, module, path, why):
        warnings.warn(f"bnorm fuse: {path or 'the model'} ({type(module).__name__}) is left unfused: {why}; "
                      f"fusing inside its children instead")
        self.untraced[path] = type(module).__name__
        for name, child in list(module._modules.items()):
            if child is not None:
                new = self.visit(child, f"{path}.{name}" if path else name)
                if new is not child:
                    module._modules[name] = new
        return module

    def rewrite(self, gm, prefix):
        """Fuses the sites of gm's graph; returns how many."""
        graph = gm.graph
        calls = [n for n in graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), BnormForward)]
        for n in graph.nodes:  # BatchNorms passed to fused modules: a model fused before
            if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), _FusedBase)
                    and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"):
                self.seen.add(id(gm.get_submodule(n.args[0].target)))
                self.report.append(f"{prefix}{n.args[0].target}: already fused as {prefix}{n.target}")
        counts = {}
        for n in calls:
            counts[n.target] = counts.get(n.target, 0) + 1
        results = {n: _match(n, gm, prefix) for n in calls}
        # Where both operands of an add are fusable BatchNorms, the left one (the one an in-place add
        # would modify) is fused, and the other is its residual.
        claimed = {}
        for n, site in results.items():
            if isinstance(site, _Site) and site.add is not None:
                if site.add not in claimed or site.add.args[0] is n:
                    claimed[site.add] = site
        # Every outcome is settled on the unmodified graph: fusing a site replaces the nodes others look at.
        outcomes, seen_calls = [], {}
        for n in calls:
            self.seen.add(id(gm.get_submodule(n.target)))
            seen_calls[n.target] = seen_calls.get(n.target, 0) + 1
            name = prefix + n.target + (f" (call {seen_calls[n.target]})" if counts[n.target] > 1 else "")
            site, winner = results[n], claimed.get(next(iter(n.users), None))
            if winner is not None and winner is not site:
                site = f"its output is the residual of the fused {prefix}{winner.bn.target}"
            outcomes.append((name, site))
        fused = 0
        for name, site in outcomes:
            if isinstance(site, _Site):
                self.report.append(f"{name}: fused {self.fuse_site(gm, site, prefix)}")
                fused += 1
            else:
                self.report.append(f"{name}: not fused: {site}")
        if fused:
            graph.lint()
            gm.recompile()
        return fused

    def fuse_site(self, gm, site, prefix):
        """Replaces the site's nodes by a fused module's call where the ReLU was; returns how."""
        graph, target = gm.graph, site.bn.target
        input, residual = site.operands()
        if site.add is None:
            wrapper, suffix, args = BatchNormReLU(target), "_relu", (input,)
            how = f"bn -> {_describe(site.relu, gm, prefix)}"
        else:
            wrapper, suffix, args = BatchNormAddReLU(target), "_add_relu", (input, residual)
            how = f"bn -> {_describe(site.add, gm, prefix)} -> {_describe(site.relu, gm, prefix)}"
        name = _install(gm, target, wrapper, suffix, self.original_ids)
        with graph.inserting_before(site.relu):
            call = graph.call_module(name, (graph.get_attr(target), *args))
        site.relu.replace_all_uses_with(call)
        for node in (site.relu, site.add, site.bn):
            if node is not None:
                graph.erase_node(node)
        return f"{how} as {prefix}{name} ({type(wrapper).__name__})"

    def report_unreached(self, model):
        """A line for each BatchNorm that no traced graph calls."""
        for path, m in model.named_modules():
            if not isinstance(m, BnormForward) or id(m) in self.seen:
                continue
            parents = [p for p in self.untraced if p == "" or path.startswith(p + ".")]
            if parents:
                parent = max(parents, key=len)
                why = (f"it is called by {parent or 'the model'} ({self.untraced[parent]}), "
                       f"which is left unfused (see the warning)")
            else:
                why = "no traced forward calls it"
            self.report.append(f"{path or 'the model'}: not fused: {why}")


def fuse(model: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """Fuses bnorm BatchNorm -> ReLU and BatchNorm -> add -> ReLU in `model` (see the module docstring).

    Returns the fused model and the report, one line per BatchNorm call (fused or not, and why). The
    result shares all modules, parameters and buffers with `model`; where the model itself cannot be
    traced, its fused children are installed in place, as bnorm.torch.convert does.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"bnorm fuse: expected a torch.nn.Module, not {type(model).__name__}")
    fuser = _Fuser(model)
    result = fuser.visit(model, "")
    fuser.report_unreached(result)
    return result, fuser.report
