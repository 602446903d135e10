"""bnorm.onnx: folds ONNX BatchNormalization nodes into the Conv, ConvTranspose, Gemm or MatMul(+Add)
that produces their input.

    folded = bnorm.onnx.fold(onnx.load("model.onnx"))           # an onnx.ModelProto; the input is unchanged
    python -m bnorm.onnx fold IN.onnx OUT.onnx [--bn-to-mul-add]  # the same from the shell, report on stderr

The folded weights come from the C++ library (bnorm.fold_weights: float64, rounded once to the
initializer's dtype; float16 initializers through float64), the same algebra as bnorm.torch.fold
(docs/folding.md). A BatchNormalization (opsets 9 to 15; later opsets have the same operators) folds
when: it is in inference mode (one output, training_mode 0); its scale, B, mean and var are
initializers that are not graph inputs (a graph input can be fed another value at run time); its
input X is not a graph output and feeds only the BN; X comes from
- Conv or ConvTranspose (any group, stride, dilation, pads) whose W (and B) are initializers;
- Gemm whose B (and C, of N values) are initializers (transA, transB, alpha, beta: any);
- MatMul with an initializer B (K, N) of an input A of rank 2 (shape inference must know it: on
  (N, C, L) inputs the BN normalizes another dim than the one MatMul produces), optionally followed by
  an Add of an initializer of N values; it becomes a Gemm.
Initializers are never modified: the folded layer gets new ones, and an old one goes only when no
node uses it any more (a weight shared by two Convs, each with its own BN, gives two new weights). The
opset imports and IR version are kept and the result passes onnx.checker. A BN that stays is kept
as it is, or with bn_to_mul_add=True, where its input's rank is known, becomes Mul + Add by per-channel
constants. A malformed model raises ValueError naming what is wrong (the input fails onnx.checker, an
initializer's data do not match its shape, a weight's sizes do not match the BN's, ...).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._folding import fold_weights

__all__ = ["fold", "main"]

_MIN_OPSET = 9
_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
           onnx.TensorProto.FLOAT16: np.float16}


class _Left(Exception):
    """A BN that cannot be folded; the message says why."""


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_names(graph, names):
    """Every name the nodes of graph and its subgraphs read (outer names included)."""
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                      list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                _subgraph_names(g, names)
    return names


class _Graph:
    def __init__(self, model):
        self.model = model
        g = self.graph = model.graph
        self.init = {t.name: t for t in g.initializer}
        self.inputs = {i.name for i in g.input}
        self.outputs = {o.name for o in g.output}
        self.names = set(self.init) | self.inputs | self.outputs
        for n in g.node:
            self.names.update(n.input)
            self.names.update(n.output)
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.uses = {}  # name -> number of reads: node inputs, subgraph reads, graph outputs
        for n in g.node:
            for i in n.input:
                if i:
                    self.uses[i] = self.uses.get(i, 0) + 1
            for a in n.attribute:
                subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for sub in subgraphs:
                    for name in _subgraph_names(sub, set()):
                        self.uses[name] = self.uses.get(name, 0) + 1
        for o in self.outputs:
            self.uses[o] = self.uses.get(o, 0) + 1
        self.ranks = self._ranks()
        self.removed = set()  # nodes to drop (by id)
        self.replaced = {}  # id(node) -> the node that takes its place

    def _ranks(self):
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # shape inference is a help only; without it rank-dependent folds are left
            return {}
        ranks = {}
        g = inferred.graph
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.HasField("shape"):
                ranks[vi.name] = len(t.shape.dim)
        for t in g.initializer:
            ranks[t.name] = len(t.dims)
        return ranks

    def fresh(self, base):
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def constant(self, name, what):
        """The initializer `name` as a NumPy array, or _Left when it is not a usable constant."""
        if name not in self.init:
            raise _Left(f"its {what} {name!r} is not an initializer")
        if name in self.inputs and self.model.ir_version >= 4:  # below 4, every initializer is an input
            raise _Left(f"its {what} {name!r} is also a graph input (it may be fed another value at run time)")
        t = self.init[name]
        if t.data_type not in _FLOATS:
            raise _Left(f"its {what} {name!r} has ONNX data type {onnx.TensorProto.DataType.Name(t.data_type)}, "
                        f"not float, double or float16")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise _Left(f"its {what} {name!r} has external data (load the model with its data)")
        try:
            a = numpy_helper.to_array(t)
        except Exception as error:
            raise ValueError(f"bnorm.onnx.fold: initializer {name!r}: its data do not match its dims "
                             f"{list(t.dims)} and data type ({error})") from None
        if list(a.shape) != list(t.dims):
            raise ValueError(f"bnorm.onnx.fold: initializer {name!r}: expected data of shape {list(t.dims)}, "
                             f"got {list(a.shape)}")
        return a

    def add_initializer(self, base, array):
        name = self.fresh(base)
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.init[name] = tensor
        if self.model.ir_version < 4:  # then every initializer is also a graph input
            self.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(array.shape)))
        return name

    def single_user(self, name, what):
        if name in self.outputs:
            raise _Left(f"its {what} {name!r} is a graph output")
        if self.uses.get(name, 0) != 1:
            raise _Left(f"its {what} {name!r} is read by {self.uses.get(name, 0)} nodes, not only by the BN")


def _float64(a):
    return a.astype(np.float64) if a.dtype == np.float16 else a


def _fold_arrays(node_name, weight, bias, bn, layout, groups):
    """fold_weights for an ONNX node: float16 through float64, errors with the node's name."""
    mean, var, scale, beta, eps = bn
    dtype = weight.dtype
    bias_dtype = dtype if bias is None else bias.dtype
    try:
        w, b = fold_weights(_float64(weight), None if bias is None else _float64(bias), _float64(mean),
                            _float64(var), _float64(scale), _float64(beta), eps, layout=layout, groups=groups)
    except (ValueError, TypeError) as error:
        raise ValueError(f"bnorm.onnx.fold: node {node_name!r}: {error}") from None
    return w.astype(dtype, copy=False), b.astype(bias_dtype, copy=False)


def _channel_vector(g, name, what, n):
    """An initializer of n values, shaped (n,) or (1, n), as (n,), or _Left."""
    a = g.constant(name, what)
    if a.size != n or a.ndim not in (1, 2) or a.shape[-1] != n:
        raise _Left(f"its {what} {name!r} has shape {list(a.shape)}, not ({n},) or (1, {n})")
    return a.reshape(n)


def _fold_one(g, bn_node):
    """Folds one BatchNormalization; returns the layer it went into, or raises _Left."""
    if len(bn_node.input) != 5 or not all(bn_node.input):
        raise ValueError(f"bnorm.onnx.fold: node {bn_node.name!r} (BatchNormalization): expected 5 inputs "
                         f"(X, scale, B, input_mean, input_var), got {len(bn_node.input)}")
    if len([o for o in bn_node.output if o]) != 1 or _attr(bn_node, "training_mode", 0):
        raise _Left("it is in training mode (it has running-statistic outputs or training_mode=1)")
    x, *params = bn_node.input
    scale, beta, mean, var = (g.constant(n, w) for n, w in zip(params, ("scale", "B", "input_mean", "input_var")))
    eps = float(_attr(bn_node, "epsilon", 1e-5))
    bn = (mean, var, scale, beta, eps)
    g.single_user(x, "input")
    producer = g.producer.get(x)
    if producer is None:
        raise _Left(f"its input {x!r} is not produced by a node")
    op = producer.op_type if producer.domain in ("", "ai.onnx") else f"{producer.domain}.{producer.op_type}"
    y = bn_node.output[0]
    where = f"{producer.name or producer.op_type} ({producer.op_type})"
    if op in ("Conv", "ConvTranspose"):
        if len(producer.input) < 2 or not producer.input[1]:
            raise ValueError(f"bnorm.onnx.fold: node {producer.name!r} ({op}): expected inputs X, W[, B]")
        weight = g.constant(producer.input[1], "producer's W")
        if weight.ndim < 3:
            raise ValueError(f"bnorm.onnx.fold: node {producer.name!r} ({op}): W: expected rank >= 3, got "
                             f"shape {list(weight.shape)}")
        bias = g.constant(producer.input[2], "producer's B") if len(producer.input) > 2 and producer.input[2] else None
        group = _attr(producer, "group", 1)
        w, b = _fold_arrays(producer.name, weight, bias, bn, "out_in" if op == "Conv" else "in_out", group)
        new_inputs = [producer.input[0], g.add_initializer(producer.input[1] + "_bnfold", w),
                      g.add_initializer((producer.input[2] if bias is not None else producer.input[1]) + "_bias_bnfold", b)]
        layer = helper.make_node(op, new_inputs, [y], name=producer.name)
        layer.attribute.extend(producer.attribute)
    elif op == "Gemm":
        if len(producer.input) < 2:
            raise ValueError(f"bnorm.onnx.fold: node {producer.name!r} (Gemm): expected inputs A, B[, C]")
        weight = g.constant(producer.input[1], "producer's B")
        if weight.ndim != 2:
            raise ValueError(f"bnorm.onnx.fold: node {producer.name!r} (Gemm): B: expected rank 2, got shape "
                             f"{list(weight.shape)}")
        trans_b = _attr(producer, "transB", 0)
        n = weight.shape[0] if trans_b else weight.shape[1]
        bias = None
        if len(producer.input) > 2 and producer.input[2]:
            bias = _channel_vector(g, producer.input[2], "producer's C", n)
            beta_attr = float(_attr(producer, "beta", 1.0))
            if beta_attr != 1.0:  # beta * C, in float64, so that the folded Gemm has beta = 1
                bias = (bias.astype(np.float64) * beta_attr).astype(bias.dtype)
        w, b = _fold_arrays(producer.name, weight, bias, bn, "out_in" if trans_b else "in_out", 1)
        layer = helper.make_node("Gemm", [producer.input[0], g.add_initializer(producer.input[1] + "_bnfold", w),
                                          g.add_initializer(producer.input[1] + "_bias_bnfold", b)], [y],
                                 name=producer.name)
        layer.attribute.extend(a for a in producer.attribute if a.name != "beta")
    elif op in ("MatMul", "Add"):
        add = None
        if op == "Add":
            add, inputs = producer, list(producer.input)
            matmuls = [g.producer.get(i) for i in inputs]
            k = next((i for i, m in enumerate(matmuls) if m is not None and m.op_type == "MatMul"), None)
            if k is None or len(inputs) != 2:
                raise _Left(f"its input comes from {where}, which does not add a MatMul's output")
            g.single_user(inputs[k], "Add's MatMul output")
            producer, c_name = matmuls[k], inputs[1 - k]
        if len(producer.input) != 2:
            raise ValueError(f"bnorm.onnx.fold: node {producer.name!r} (MatMul): expected inputs A, B")
        a_name, b_name = producer.input
        if g.ranks.get(a_name) != 2:
            rank = g.ranks.get(a_name)
            raise _Left(f"{producer.name or 'its MatMul'}'s input {a_name!r} has "
                        f"{'an unknown rank' if rank is None else f'rank {rank}'}: only (N, K) inputs fold "
                        f"(the BN normalizes dim 1)")
        weight = g.constant(b_name, "MatMul's B")
        if weight.ndim != 2:
            raise _Left(f"its MatMul's B {b_name!r} has rank {weight.ndim}, not 2")
        bias = _channel_vector(g, c_name, "Add's constant", weight.shape[1]) if add is not None else None
        w, b = _fold_arrays(producer.name, weight, bias, bn, "in_out", 1)
        layer = helper.make_node("Gemm", [a_name, g.add_initializer(b_name + "_bnfold", w),
                                          g.add_initializer(b_name + "_bias_bnfold", b)], [y],
                                 name=g.fresh((producer.name or "MatMul") + "_gemm"))
        if add is not None:
            g.removed.add(id(add))
        where = f"{producer.name or 'MatMul'} (MatMul{' + Add' if add is not None else ''}, now a Gemm)"
    else:
        raise _Left(f"its input comes from {where}, not from Conv, ConvTranspose, Gemm or MatMul")
    g.replaced[id(producer)] = layer
    g.removed.add(id(bn_node))
    return where


def _mul_add(g, bn_node):
    """Mul + Add nodes for a BN that stays, or None where its input's rank is unknown."""
    x, *params = bn_node.input
    rank = g.ranks.get(x)
    if rank is None or rank < 2 or len([o for o in bn_node.output if o]) != 1 or _attr(bn_node, "training_mode", 0):
        return None
    try:
        scale, beta, mean, var = (g.constant(n, w) for n, w in zip(params, ("scale", "B", "input_mean", "input_var")))
    except _Left:
        return None
    if mean.ndim != 1:
        return None
    c = mean.shape[0]
    eps = float(_attr(bn_node, "epsilon", 1e-5))
    # s and t from the library: the BN folded into the identity (C, 1) weight.
    s, t = _fold_arrays(bn_node.name, np.ones((c, 1), mean.dtype), None, (mean, var, scale, beta, eps), "out_in", 1)
    shape = (c,) + (1,) * (rank - 2)
    base = bn_node.name or "bn"
    s_name, t_name = g.add_initializer(base + "_scale", s.reshape(shape)), g.add_initializer(base + "_shift", t.reshape(shape))
    mid = g.fresh(base + "_scaled")
    return [helper.make_node("Mul", [x, s_name], [mid], name=g.fresh(base + "_mul")),
            helper.make_node("Add", [mid, t_name], [bn_node.output[0]], name=g.fresh(base + "_add"))]


def _check_names(graph):
    """Every name is text: protobuf hands out the bytes of a name that is not valid UTF-8."""
    values = [(n.name, "node name") for n in graph.node] + [(n.op_type, "op_type") for n in graph.node]
    values += [(v, "tensor name") for n in graph.node for v in list(n.input) + list(n.output)]
    values += [(v.name, "tensor name") for v in list(graph.initializer) + list(graph.input) + list(graph.output)]
    values += [(a.name, "attribute name") for n in graph.node for a in n.attribute]
    for value, what in values:
        if not isinstance(value, str):
            raise ValueError(f"bnorm.onnx.fold: a {what} is not valid UTF-8: {value!r}")


def _check(model, what):
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # the checker raises several kinds
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"bnorm.onnx.fold: {what} fails onnx.checker: {first}") from None


def fold(model: onnx.ModelProto, bn_to_mul_add: bool = False, *, return_report: bool = False):
    """Folds the BatchNormalization nodes of a copy of `model` (see the module docstring). Returns the
    folded model, and with return_report=True also the report: one line per BatchNormalization,
    folded into which node, or left and why."""
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"bnorm.onnx.fold: model: expected an onnx.ModelProto, got {type(model).__name__}")
    _check(model, "the input model")
    _check_names(model.graph)
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is None or opset < _MIN_OPSET:
        raise ValueError(f"bnorm.onnx.fold: opset_import: expected the default domain at opset >= {_MIN_OPSET}, "
                         f"got {opset}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    report, extra = [], {}
    for node in list(out.graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"BatchNormalization -> {node.output[0] if node.output else '?'}"
        try:
            report.append(f"{name}: folded into {_fold_one(g, node)}")
        except _Left as why:
            nodes = _mul_add(g, node) if bn_to_mul_add else None
            if nodes:
                extra[id(node)] = nodes
                g.removed.add(id(node))
            report.append(f"{name}: left{' as Mul + Add' if nodes else ''}: {why}")
    if g.removed or g.replaced:
        nodes = []
        for n in out.graph.node:
            if id(n) in g.replaced:
                nodes.append(g.replaced[id(n)])
            elif id(n) in extra:
                nodes.extend(extra[id(n)])
            elif id(n) not in g.removed:
                nodes.append(n)
        used = _subgraph_names(helper.make_graph(nodes, "used", [], []), set()) | g.outputs
        old = {t.name for t in out.graph.initializer}
        keep = [t for t in out.graph.initializer if t.name in used]
        dropped = old - {t.name for t in keep}
        # Tensors that no longer exist lose their value_info; graph inputs stay (the interface is kept),
        # except the ones that only stood for a dropped initializer (IR version 3).
        produced = {o for n in nodes for o in n.output} | {i.name for i in out.graph.input}
        value_info = [v for v in out.graph.value_info if v.name in produced]
        inputs = [i for i in out.graph.input if not (i.name in dropped and out.ir_version < 4)]
        del out.graph.node[:], out.graph.initializer[:], out.graph.value_info[:], out.graph.input[:]
        out.graph.node.extend(nodes)
        out.graph.initializer.extend(keep)
        out.graph.value_info.extend(value_info)
        out.graph.input.extend(inputs)
    _check(out, "the folded model (a bnorm bug: please report it)")
    return (out, report) if return_report else out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bnorm.onnx",
                                      description="Folds BatchNormalization into Conv/ConvTranspose/Gemm/MatMul.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fold", help="fold IN.onnx into OUT.onnx")
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("--bn-to-mul-add", action="store_true", help="turn a BN that stays into Mul + Add")
    args = parser.parse_args(argv)
    try:
        model = onnx.load(args.input)
    except Exception as error:
        print(f"python -m bnorm.onnx fold: {args.input}: cannot read an ONNX model ({error})", file=sys.stderr)
        return 2
    try:
        folded, report = fold(model, args.bn_to_mul_add, return_report=True)
    except ValueError as error:
        print(f"python -m bnorm.onnx fold: {args.input}: {error}", file=sys.stderr)
        return 1
    for line in report:
        print(line, file=sys.stderr)
    onnx.save(folded, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
