"""bnorm.onnx.fold: graphs built with onnx.helper for each pattern, run in onnxruntime before and
after folding; malformed and mutated models."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import bnorm.onnx  # noqa: E402

F32 = TensorProto.FLOAT


def _bn(name, x, y, c, rng, eps=1e-5):
    """A BatchNormalization node and its four initializers (random statistics)."""
    inits = [numpy_helper.from_array(a.astype(np.float32), f"{name}_{k}") for k, a in (
        ("scale", rng.uniform(0.5, 1.5, c)), ("B", rng.uniform(-0.5, 0.5, c)),
        ("mean", rng.uniform(-0.5, 0.5, c)), ("var", rng.uniform(0.5, 2.0, c)))]
    node = helper.make_node("BatchNormalization", [x] + [t.name for t in inits], [y], name=name, epsilon=eps)
    return node, inits


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _model(nodes, inits, inputs, outputs, opset=13, ir_version=None):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F32, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, F32, [None] * len(inputs[0][1])) for n in outputs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(onnx.IR_VERSION, 8)  # what this onnxruntime reads
    onnx.checker.check_model(model)
    return model


def _run(model, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the mutated models of the fuzz test
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _op_count(model, op):
    return sum(n.op_type == op for n in model.graph.node)


def _check_same(model, folded, shapes, tol=1e-5):
    rng = np.random.default_rng(7)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}
    for a, b in zip(_run(model, feeds), _run(folded, feeds), strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= tol * np.abs(a).max()


def _conv_bn(rng, opset=13, op="Conv", group=2, bias=True, c_out=6, **attrs):
    c_in = 4
    w_shape = (c_out, c_in // group, 3, 3) if op == "Conv" else (c_in, c_out // group, 3, 3)
    inits = [_init("W", rng.standard_normal(w_shape))] + ([_init("Cb", rng.standard_normal(c_out))] if bias else [])
    conv = helper.make_node(op, ["X", "W"] + (["Cb"] if bias else []), ["T"], name="conv", group=group, **attrs)
    bn, bn_inits = _bn("bn", "T", "Y", c_out, rng)
    return _model([conv, bn], inits + bn_inits, [("X", [2, c_in, 9, 8])], ["Y"], opset), [("X", (2, c_in, 9, 8))]


def _gemm_bn(rng, trans_b, with_c=True, alpha=1.0, beta=1.0):
    k, n = 5, 7
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    inits = [_init("B", b)] + ([_init("C", rng.standard_normal(n))] if with_c else [])
    gemm = helper.make_node("Gemm", ["A", "B"] + (["C"] if with_c else []), ["T"], name="gemm", transB=trans_b,
                            alpha=alpha, beta=beta)
    bn, bn_inits = _bn("bn", "T", "Y", n, rng)
    return _model([gemm, bn], inits + bn_inits, [("A", [3, k])], ["Y"]), [("A", (3, k))]


def _matmul_bn(rng, add=True, a_shape=(3, 5)):
    k, n = a_shape[-1], 4
    nodes = [helper.make_node("MatMul", ["A", "B"], ["M"], name="mm")]
    inits = [_init("B", rng.standard_normal((k, n)))]
    if add:
        nodes.append(helper.make_node("Add", ["Cadd", "M"], ["T"], name="add"))
        inits.append(_init("Cadd", rng.standard_normal(n)))
    bn, bn_inits = _bn("bn", "T" if add else "M", "Y", a_shape[1] if len(a_shape) == 3 else n, rng)
    return _model(nodes + [bn], inits + bn_inits, [("A", list(a_shape))], ["Y"]), [("A", a_shape)]


ONNX_FOLDING = {
    "conv grouped dilated padded no bias": lambda rng: _conv_bn(rng, bias=False, dilations=[2, 1], pads=[1, 0, 2, 1]),
    "conv strided with bias": lambda rng: _conv_bn(rng, strides=[2, 2]),
    "convtranspose grouped strided": lambda rng: _conv_bn(rng, op="ConvTranspose", strides=[2, 1]),
    "convtranspose depthwise no bias": lambda rng: _conv_bn(rng, op="ConvTranspose", group=4, c_out=4, bias=False),
    "gemm transB=1 alpha beta": lambda rng: _gemm_bn(rng, 1, alpha=0.5, beta=2.0),
    "gemm transB=0 without C": lambda rng: _gemm_bn(rng, 0, with_c=False),
    "matmul + add": lambda rng: _matmul_bn(rng),
    "matmul": lambda rng: _matmul_bn(rng, add=False),
}


@pytest.mark.parametrize("case", list(ONNX_FOLDING))
def test_onnx_patterns_fold(case):
    model, shapes = ONNX_FOLDING[case](np.random.default_rng(1))
    before = model.SerializeToString()
    folded, report = bnorm.onnx.fold(model, return_report=True)
    assert model.SerializeToString() == before  # the input is not modified
    assert _op_count(folded, "BatchNormalization") == 0 and "folded into" in report[0], report
    assert folded.ir_version == model.ir_version and list(folded.opset_import) == list(model.opset_import)
    _check_same(model, folded, shapes)


@pytest.mark.parametrize("opset", [*range(9, 16), 17, 20])
def test_onnx_opsets_9_to_15(opset):
    model, shapes = _conv_bn(np.random.default_rng(opset), opset=opset)
    folded = bnorm.onnx.fold(model)
    assert _op_count(folded, "BatchNormalization") == 0
    assert folded.opset_import[0].version == opset
    _check_same(model, folded, shapes)


def test_onnx_ir_version_3_keeps_initializers_as_inputs():
    model, shapes = _conv_bn(np.random.default_rng(2), opset=9)
    model.ir_version = 3
    for t in model.graph.initializer:  # IR 3: every initializer is a graph input too
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    folded = bnorm.onnx.fold(model)
    names = {i.name for i in folded.graph.input}
    assert {t.name for t in folded.graph.initializer} <= names and "W" not in names
    _check_same(model, folded, shapes)


def test_onnx_shared_weight_gets_a_copy_per_conv():
    rng = np.random.default_rng(3)
    w = _init("W", rng.standard_normal((6, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["X", "W"], ["T1"], name="c1"), helper.make_node("Conv", ["X", "W"], ["T2"], name="c2")]
    bn1, i1 = _bn("bn1", "T1", "Y1", 6, rng)
    bn2, i2 = _bn("bn2", "T2", "Y2", 6, rng)
    model = _model(nodes + [bn1, bn2], [w] + i1 + i2, [("X", [1, 4, 7, 7])], ["Y1", "Y2"])
    folded = bnorm.onnx.fold(model)
    assert _op_count(folded, "BatchNormalization") == 0
    weights = [n.input[1] for n in folded.graph.node if n.op_type == "Conv"]
    assert len(set(weights)) == 2 and "W" not in weights
    assert "W" not in {t.name for t in folded.graph.initializer}  # unused now
    assert numpy_helper.to_array(model.graph.initializer[0]).tobytes() == numpy_helper.to_array(w).tobytes()
    _check_same(model, folded, [("X", (1, 4, 7, 7))])


def test_onnx_weight_shared_with_an_unfolded_node_stays():
    rng = np.random.default_rng(4)
    w = _init("W", rng.standard_normal((6, 4, 1, 1)))
    nodes = [helper.make_node("Conv", ["X", "W"], ["T"], name="c1"), helper.make_node("Conv", ["X", "W"], ["Z"], name="c2")]
    bn, inits = _bn("bn", "T", "Y", 6, rng)
    model = _model(nodes + [bn], [w] + inits, [("X", [1, 4, 5, 5])], ["Y", "Z"])
    folded = bnorm.onnx.fold(model)
    assert "W" in {t.name for t in folded.graph.initializer}
    assert [n.input[1] for n in folded.graph.node if n.name == "c2"] == ["W"]
    _check_same(model, folded, [("X", (1, 4, 5, 5))])


def test_onnx_bn_whose_input_is_a_graph_output_is_left():
    model, shapes = _conv_bn(np.random.default_rng(5))
    model.graph.output.append(helper.make_tensor_value_info("T", F32, [None] * 4))
    folded, report = bnorm.onnx.fold(model, return_report=True)
    assert report == ["bn: left: its input 'T' is a graph output"]
    assert [o.name for o in folded.graph.output] == ["Y", "T"]
    _check_same(model, folded, shapes)
    # As Mul + Add, with the rank known: no BN, the same outputs.
    folded = bnorm.onnx.fold(model, bn_to_mul_add=True)
    assert _op_count(folded, "BatchNormalization") == 0 and _op_count(folded, "Mul") == 1
    _check_same(model, folded, shapes)


def test_onnx_cases_that_cannot_fold_are_left_with_a_reason():
    rng = np.random.default_rng(6)
    model, shapes = _matmul_bn(rng, a_shape=(2, 4, 5))  # (N, C, L) @ (L, n): the BN normalizes C
    folded, report = bnorm.onnx.fold(model, bn_to_mul_add=True, return_report=True)
    assert report == ["bn: left as Mul + Add: mm's input 'A' has rank 3: only (N, K) inputs fold "
                      "(the BN normalizes dim 1)"]
    _check_same(model, folded, shapes)
    relu = helper.make_node("Relu", ["X"], ["R"])
    bn, inits = _bn("bn", "R", "Y", 3, rng)
    model = _model([relu, bn], inits, [("X", [2, 3, 4])], ["Y"])
    folded, report = bnorm.onnx.fold(model, return_report=True)
    assert report == ["bn: left: its input comes from Relu (Relu), not from Conv, ConvTranspose, Gemm or MatMul"]
    assert _op_count(folded, "BatchNormalization") == 1


def test_onnx_errors_name_what_is_wrong(tmp_path):
    rng = np.random.default_rng(8)
    with pytest.raises(TypeError, match="model: expected an onnx.ModelProto, got bytes"):
        bnorm.onnx.fold(b"\x08\x07")
    model, _ = _conv_bn(rng)
    model.graph.initializer[-1].CopyFrom(_init("bn_var", np.ones(5)))  # 5 variances for 6 channels
    with pytest.raises(ValueError, match=r"node 'conv': bnorm::fold_into_producer: bn.running_var: expected 6 values"):
        bnorm.onnx.fold(model)
    model, _ = _conv_bn(rng)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    with pytest.raises(ValueError, match=r"the input model fails onnx.checker: TensorProto \(tensor name: W\) raw_data"):
        bnorm.onnx.fold(model)
    model, _ = _conv_bn(rng, opset=8)
    with pytest.raises(ValueError, match=r"opset_import: expected the default domain at opset >= 9, got 8"):
        bnorm.onnx.fold(model)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ValueError, match=r"the input model fails onnx.checker"):
        bnorm.onnx.fold(bad)


def test_onnx_command_line(tmp_path):
    import subprocess
    import sys

    model, shapes = _conv_bn(np.random.default_rng(9))
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    run = subprocess.run([sys.executable, "-m", "bnorm.onnx", "fold", str(src), str(dst)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "bn: folded into conv (Conv)\n"
    _check_same(model, onnx.load(dst), shapes)
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00junk")
    run = subprocess.run([sys.executable, "-m", "bnorm.onnx", "fold", str(tmp_path / "junk.onnx"), str(dst)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "cannot read an ONNX model" in run.stderr


def test_onnx_mutation_fuzz():
    """Random byte flips and structural changes of the test models: fold either returns a model that
    passes onnx.checker (fold checks it) or raises ValueError; nothing else, and no crash. Where
    onnxruntime runs a mutated model, its folded form gives the same outputs."""
    rng = np.random.default_rng(10)
    seeds = [make(np.random.default_rng(i))[0] for i, make in enumerate(ONNX_FOLDING.values())]
    outcomes = {"folded": 0, "ValueError": 0, "unparsable": 0, "compared": 0}
    for trial in range(300):
        model = onnx.ModelProto()
        model.CopyFrom(seeds[trial % len(seeds)])
        if trial % 2:  # structural: an initializer's dims, an attribute, a node's input
            g = model.graph
            choice = rng.integers(3)
            if choice == 0 and g.initializer:
                t = g.initializer[rng.integers(len(g.initializer))]
                if t.dims:
                    t.dims[rng.integers(len(t.dims))] = int(rng.integers(0, 9))
            elif choice == 1:
                node = g.node[rng.integers(len(g.node))]
                node.attribute.append(helper.make_attribute(["group", "transB", "epsilon", "training_mode"][
                    rng.integers(4)], int(rng.integers(-1, 4))))
            else:
                node = g.node[rng.integers(len(g.node))]
                if node.input:
                    node.input[rng.integers(len(node.input))] = str(rng.choice(
                        [t.name for t in g.initializer] + ["", "A", "X"]))
        else:
            data = bytearray(model.SerializeToString())
            for _ in range(int(rng.integers(1, 4))):
                data[rng.integers(len(data))] = int(rng.integers(256))
            try:
                model = onnx.ModelProto.FromString(bytes(data))
            except Exception:
                outcomes["unparsable"] += 1
                continue
        try:
            folded = bnorm.onnx.fold(model)
            outcomes["folded"] += 1
        except ValueError:
            outcomes["ValueError"] += 1
            continue
        # Where onnxruntime runs the mutated model, the folded one computes the same.
        shapes = [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim)) for i in model.graph.input
                  if i.name in ("A", "X")]
        try:
            _run(model, {n: np.ones(s, np.float32) for n, s in shapes})
        except Exception:
            continue
        _check_same(model, folded, shapes)
        outcomes["compared"] += 1
    assert outcomes["folded"] > 0 and outcomes["ValueError"] > 0 and outcomes["compared"] > 0, outcomes


def test_onnx_float16_initializers_are_rounded_once():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((4, 2, 3)).astype(np.float16)
    conv = helper.make_node("Conv", ["X", "W"], ["T"], name="conv")
    stats = {k: rng.uniform(lo, hi, 4).astype(np.float16) for k, lo, hi in (
        ("scale", 0.5, 1.5), ("B", -0.5, 0.5), ("mean", -0.5, 0.5), ("var", 0.5, 2.0))}
    bn = helper.make_node("BatchNormalization", ["T"] + [f"bn_{k}" for k in stats], ["Y"], name="bn")
    inits = [numpy_helper.from_array(w, "W")] + [numpy_helper.from_array(v, f"bn_{k}") for k, v in stats.items()]
    graph = helper.make_graph([conv, bn], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [1, 2, 5])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [1, 4, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    folded = bnorm.onnx.fold(model)
    got = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    s = stats["scale"].astype(np.float64) / np.sqrt(stats["var"].astype(np.float64) + 1e-5)
    expected_w = (w.astype(np.float64) * s[:, None, None]).astype(np.float16)
    expected_b = (stats["B"].astype(np.float64) - stats["mean"].astype(np.float64) * s).astype(np.float16)
    assert got["W_bnfold"].dtype == np.float16 and np.array_equal(got["W_bnfold"], expected_w)
    np.testing.assert_array_max_ulp(got["W_bias_bnfold"], expected_b, maxulp=1)
