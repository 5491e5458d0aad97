"""Fuzzing: random mutations of small valid models (structure, types, shapes, attributes, opsets, bytes) go
through ``ORTQuantizer.from_pretrained(...).quantize(...)``. Only ortq's own errors may escape; a model that
quantizes must pass onnx.checker and load in ONNX Runtime. The CLI never prints a traceback.

Each model is derived from a seed, so a failure names the seed and the mutations that reproduce it.
The default run covers 200 fixed seeds; ``-m slow`` runs 500 models.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from ortq import AutoQuantizationConfig
from ortq.cli import main
from ortq.config import CalibrationConfig, WeightOnlyConfig
from ortq.errors import OrtqError
from ortq.quantizer import ORTQuantizer

# ------------------------------------------------------------------------------------------- seeds


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _finish(graph, opset=17):
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _mlp(rng):
    nodes = [
        h.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        h.make_node("Add", ["h", "B1"], ["hb"], name="add1"),
        h.make_node("Relu", ["hb"], ["r"], name="relu"),
        h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    inits = [nh.from_array(_w(rng, 8, 16), "W1"), nh.from_array(_w(rng, 16), "B1"), nh.from_array(_w(rng, 16, 4), "W2")]
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], inits)
    return _finish(g), {"x": (8,)}


def _gemm(rng):
    nodes = [
        h.make_node("Gemm", ["x", "W", "B"], ["g"], name="fc", transB=1),
        h.make_node("Sigmoid", ["g"], ["y"], name="act"),
    ]
    inits = [nh.from_array(_w(rng, 6, 8), "W"), nh.from_array(_w(rng, 6), "B")]
    g = h.make_graph(nodes, "gemm", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 6])], inits)
    return _finish(g, 13), {"x": (8,)}


def _conv(rng):
    nodes = [
        h.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        h.make_node("Flatten", ["p"], ["f"], name="flat"),
        h.make_node("MatMul", ["f", "W2"], ["y"], name="head"),
    ]
    inits = [nh.from_array(_w(rng, 4, 3, 3, 3), "W"), nh.from_array(_w(rng, 4), "B"), nh.from_array(_w(rng, 4, 2), "W2")]
    g = h.make_graph(nodes, "conv", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 6, 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 2])], inits)
    return _finish(g, 12), {"x": (3, 6, 6)}


def _constants_opset11(rng):
    nodes = [
        h.make_node("Constant", [], ["W"], value=nh.from_array(_w(rng, 8, 8), "W"), name="cw"),
        h.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        h.make_node("Constant", [], ["shape"], value=nh.from_array(np.array([-1, 4, 2], np.int64), "shape"), name="cs"),
        h.make_node("Reshape", ["h", "shape"], ["y"], name="reshape"),
    ]
    g = h.make_graph(nodes, "consts", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 2])])
    return _finish(g, 11), {"x": (8,)}


def _with_if(rng):
    then_g = h.make_graph([h.make_node("Neg", ["h"], ["t"], name="neg")], "then", [],
                          [h.make_tensor_value_info("t", T.FLOAT, ["N", 8])])
    else_g = h.make_graph([h.make_node("Abs", ["h"], ["e"], name="abs")], "else", [],
                          [h.make_tensor_value_info("e", T.FLOAT, ["N", 8])])
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        h.make_node("ReduceMean", ["h"], ["m"], name="mean", keepdims=0),
        h.make_node("Greater", ["m", "zero"], ["c"], name="gt"),
        h.make_node("If", ["c"], ["z"], name="if", then_branch=then_g, else_branch=else_g),
        h.make_node("MatMul", ["z", "W2"], ["y"], name="mm2"),
    ]
    inits = [nh.from_array(_w(rng, 8, 8), "W"), nh.from_array(np.array(0.0, np.float32), "zero"),
             nh.from_array(_w(rng, 8, 3), "W2")]
    g = h.make_graph(nodes, "if", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])], inits)
    return _finish(g), {"x": (8,)}


def _lstm(rng):
    nodes = [
        h.make_node("Transpose", ["x"], ["xt"], name="to_seq", perm=[1, 0, 2]),
        h.make_node("LSTM", ["xt", "W", "R"], ["Y"], name="lstm", hidden_size=4),
        h.make_node("Squeeze", ["Y", "ax"], ["Ys"], name="sq"),
        h.make_node("MatMul", ["Ys", "W2"], ["y"], name="head"),
    ]
    inits = [nh.from_array(_w(rng, 1, 16, 5), "W"), nh.from_array(_w(rng, 1, 16, 4), "R"),
             nh.from_array(np.array([1], np.int64), "ax"), nh.from_array(_w(rng, 4, 2), "W2")]
    g = h.make_graph(nodes, "lstm", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 5])],
                     [h.make_tensor_value_info("y", T.FLOAT, [3, "N", 2])], inits)
    return _finish(g), {"x": (3, 5)}


SEEDS: list[Callable] = [_mlp, _gemm, _conv, _constants_opset11, _with_if, _lstm]

# --------------------------------------------------------------------------------------- mutations

_DTYPES = [T.FLOAT, T.FLOAT16, T.DOUBLE, T.INT32, T.INT64, T.INT8, T.UINT8, T.BOOL, T.STRING, T.BFLOAT16, 0, 999]
_OPS = ["MatMul", "Gemm", "Conv", "Relu", "Add", "If", "LSTM", "Identity", "QuantizeLinear", "Reshape", "Foo", ""]


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def _drop_node(m, r):
    if m.graph.node:
        del m.graph.node[r.randrange(len(m.graph.node))]


def _drop_input(m, r):
    if m.graph.input:
        del m.graph.input[r.randrange(len(m.graph.input))]


def _drop_initializer(m, r):
    if m.graph.initializer:
        del m.graph.initializer[r.randrange(len(m.graph.initializer))]


def _drop_node_input(m, r):
    nodes = [n for n in _all_nodes(m.graph) if n.input]
    if nodes:
        n = r.choice(nodes)
        del n.input[r.randrange(len(n.input))]


def _rename_node_input(m, r):
    nodes = [n for n in _all_nodes(m.graph) if n.input]
    if nodes:
        n = r.choice(nodes)
        n.input[r.randrange(len(n.input))] = r.choice(["", "ghost", "x", "y", "W", "h"])


def _change_op_type(m, r):
    nodes = list(_all_nodes(m.graph))
    if nodes:
        r.choice(nodes).op_type = r.choice(_OPS)


def _change_domain(m, r):
    nodes = list(_all_nodes(m.graph))
    if nodes:
        r.choice(nodes).domain = r.choice(["com.microsoft", "ai.onnx.ml", "custom", "ai.onnx"])


def _change_input_dtype(m, r):
    vis = list(m.graph.input) + list(m.graph.output)
    if vis:
        r.choice(vis).type.tensor_type.elem_type = r.choice(_DTYPES)


def _change_initializer_dtype(m, r):
    if m.graph.initializer:
        t = r.choice(m.graph.initializer)
        t.data_type = r.choice(_DTYPES)


def _change_initializer_dims(m, r):
    if m.graph.initializer:
        t = r.choice(m.graph.initializer)
        if t.dims and r.random() < 0.5:
            t.dims[r.randrange(len(t.dims))] = r.choice([0, 1, 2, 3, 1000, -1])
        else:
            t.dims.append(r.choice([1, 2]))


def _cast_initializer(m, r):
    """A consistent dtype change (data converted), so the model may still be valid."""
    floats = [i for i, t in enumerate(m.graph.initializer) if t.data_type == T.FLOAT]
    if floats:
        i = r.choice(floats)
        arr = nh.to_array(m.graph.initializer[i])
        dtype = r.choice([np.float16, np.float64, np.int32, np.int64])
        m.graph.initializer[i].CopyFrom(nh.from_array(arr.astype(dtype), m.graph.initializer[i].name))


def _nan_initializer(m, r):
    floats = [i for i, t in enumerate(m.graph.initializer) if t.data_type == T.FLOAT and t.dims]
    if floats:
        i = r.choice(floats)
        arr = nh.to_array(m.graph.initializer[i]).copy()
        arr.flat[r.randrange(arr.size)] = r.choice([np.nan, np.inf, -np.inf, 1e38])
        m.graph.initializer[i].CopyFrom(nh.from_array(arr, m.graph.initializer[i].name))


def _change_input_shape(m, r):
    if m.graph.input:
        shape = r.choice(m.graph.input).type.tensor_type.shape
        if shape.dim and r.random() < 0.6:
            d = shape.dim[r.randrange(len(shape.dim))]
            d.dim_value = r.choice([0, 1, 2, 5, 7, 4096])
        else:
            shape.dim.add().dim_value = r.choice([1, 2])


def _change_attribute(m, r):
    nodes = [n for n in _all_nodes(m.graph) if n.attribute]
    if nodes:
        n = r.choice(nodes)
        a = r.choice(n.attribute)
        if a.type == onnx.AttributeProto.INT:
            a.i = r.choice([-1, 0, 2, 5, 1 << 40])
        elif a.type == onnx.AttributeProto.INTS:
            a.ints[:] = r.choice([[], [0], [-1, -1], [1, 2, 3, 4, 5, 6, 7, 8], [100, 100, 100, 100]])
        elif a.type == onnx.AttributeProto.GRAPH:
            if a.g.node:
                del a.g.node[0]
        else:
            a.name = r.choice(["bogus", a.name + "x"])
    else:
        nodes = list(_all_nodes(m.graph))
        if nodes:
            r.choice(nodes).attribute.append(h.make_attribute(r.choice(["axis", "transB", "bogus"]), 1))


def _change_opset(m, r):
    m.opset_import[0].version = r.choice([1, 5, 7, 9, 10, 11, 12, 13, 15, 18, 21, 23, 25, 26, 27, 99])


def _change_ir_version(m, r):
    m.ir_version = r.choice([0, 1, 3, 4, 7, 10, 11, 12, 99])


def _duplicate_node(m, r):
    if m.graph.node:
        m.graph.node.append(m.graph.node[r.randrange(len(m.graph.node))])


def _reverse_nodes(m, r):
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))


def _drop_output(m, r):
    if m.graph.output:
        del m.graph.output[r.randrange(len(m.graph.output))]


def _valid_opset(m, r):
    m.opset_import[0].version = r.choice([10, 11, 12, 13, 14, 17, 19, 21])


def _flip_trans(m, r):
    for n in _all_nodes(m.graph):
        if n.op_type == "Gemm":
            n.attribute.append(h.make_attribute(r.choice(["transA", "transB"]), 1))
            seen = {}
            for a in list(n.attribute):
                seen[a.name] = a
            del n.attribute[:]
            n.attribute.extend(seen.values())


def _swap_operands(m, r):
    nodes = [n for n in _all_nodes(m.graph) if n.op_type in ("MatMul", "Gemm", "Add") and len(n.input) >= 2]
    if nodes:
        n = r.choice(nodes)
        n.input[0], n.input[1] = n.input[1], n.input[0]


def _weight_to_constant_node(m, r):
    if m.graph.initializer:
        i = r.randrange(len(m.graph.initializer))
        t = onnx.TensorProto()
        t.CopyFrom(m.graph.initializer[i])
        del m.graph.initializer[i]
        m.graph.node.insert(0, h.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}"))


def _initializer_as_input(m, r):
    if m.graph.initializer:
        t = r.choice(m.graph.initializer)
        m.graph.input.append(h.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _special_weight(m, r):
    floats = [i for i, t in enumerate(m.graph.initializer) if t.data_type == T.FLOAT and t.dims]
    if floats:
        i = r.choice(floats)
        arr = nh.to_array(m.graph.initializer[i])
        fill = r.choice([0.0, 1e-30, 1e30, -3.0, 65504.0])
        m.graph.initializer[i].CopyFrom(nh.from_array(np.full_like(arr, fill), m.graph.initializer[i].name))


def _static_batch(m, r):
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_value = r.choice([1, 2, 12])


def _intermediate_output(m, r):
    produced = [o for n in m.graph.node for o in n.output if o not in {v.name for v in m.graph.output}]
    if produced:
        m.graph.output.append(h.make_empty_tensor_value_info(r.choice(produced)))


def _weird_names(m, r):
    suffix = r.choice([":0", "/read:0", " ", "é", "::", ".tmp_0", "\\x"])
    renames = {}
    for t in m.graph.initializer:
        renames[t.name] = t.name + suffix
        t.name = renames[t.name]
    for n in _all_nodes(m.graph):
        n.input[:] = [renames.get(i, i) for i in n.input]
        n.name = n.name + suffix


def _unnamed_nodes(m, r):
    for n in m.graph.node:
        n.name = r.choice(["", "same"])


SOFT = [
    _nan_initializer, _cast_initializer, _valid_opset, _flip_trans, _swap_operands, _weight_to_constant_node,
    _initializer_as_input, _special_weight, _static_batch, _intermediate_output, _weird_names, _unnamed_nodes,
    _change_input_shape,
]

STRUCTURAL = [
    _drop_node, _drop_input, _drop_initializer, _drop_node_input, _rename_node_input, _change_op_type,
    _change_domain, _change_input_dtype, _change_initializer_dtype, _change_initializer_dims, _cast_initializer,
    _nan_initializer, _change_input_shape, _change_attribute, _change_opset, _change_ir_version, _duplicate_node,
    _reverse_nodes, _drop_output,
]


def _corrupt_bytes(data: bytes, r: random.Random) -> bytes:
    b = bytearray(data)
    kind = r.randrange(4)
    if kind == 0:  # flip a few bytes
        for _ in range(r.randint(1, 8)):
            b[r.randrange(len(b))] = r.randrange(256)
    elif kind == 1:  # truncate
        b = b[: r.randrange(len(b))]
    elif kind == 2:  # insert garbage
        pos = r.randrange(len(b))
        b[pos:pos] = bytes(r.randrange(256) for _ in range(r.randint(1, 32)))
    else:  # duplicate a chunk
        i = r.randrange(len(b))
        b += b[i : i + r.randint(1, 64)]
    return bytes(b)


def make_case(seed: int, folder: Path) -> tuple[Path, Path, list[str]]:
    """Write the mutated model and its calibration data; return their paths and the mutation names."""
    r = random.Random(seed)
    rng = np.random.default_rng(seed)
    model, shapes = r.choice(SEEDS)(rng)
    applied = []
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        if r.random() < 0.15:
            applied.append("bytes")
            continue
        mut = r.choice(SOFT if r.random() < 0.6 else STRUCTURAL)
        try:
            mut(model, r)
        except (ValueError, TypeError):  # a data mutation on a tensor an earlier mutation already broke
            continue
        applied.append(mut.__name__.lstrip("_"))
    data = model.SerializeToString()
    for name in applied:
        if name == "bytes":
            data = _corrupt_bytes(data, r)
    path = folder / f"fuzz_{seed}.onnx"
    path.write_bytes(data)
    cal = folder / f"fuzz_{seed}.npz"
    np.savez(cal, **{k: rng.standard_normal((12, *s)).astype(np.float32) for k, s in shapes.items()})
    return path, cal, applied


def fuzz_one(seed: int, folder: Path) -> str:
    """Quantize one mutated model (static int8; every third seed weight-only int4). Returns the outcome: ``ok``
    or the ortq error type. Anything else raises."""
    path, cal, applied = make_case(seed, folder)
    out = folder / f"out_{seed}"
    weight_only = seed % 3 == 0
    try:
        q = ORTQuantizer.from_pretrained(path)
        q.show_progress = False
        if weight_only:
            written = q.quantize(WeightOnlyConfig(bits=4, block_size=16), out)
        else:
            written = q.quantize(AutoQuantizationConfig.avx2(), out, calibration_data=cal,
                                 calibration_config=CalibrationConfig(batch_size=4))
    except OrtqError as exc:
        assert "\n" not in str(exc), (seed, applied, str(exc))
        assert not out.exists(), (seed, applied, "output left after an error")
        return type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"seed {seed} ({'+'.join(applied)}): {type(exc).__name__}: {exc}") from exc
    if weight_only:  # round-to-nearest never runs the model: a model ONNX Runtime rejects stays rejected
        onnx.checker.check_model(str(written))
        return "ok"
    try:
        onnx.checker.check_model(str(written))
        sess = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
        with np.load(cal) as npz:  # the data calibration ran on runs through the quantized model too (in
            # batches of the graph's batch dimension where it is fixed)
            feeds = {i.name: npz[i.name][:i.shape[0] if isinstance(i.shape[0], int) else 4]
                     for i in sess.get_inputs() if i.name in npz.files and i.shape}
        if len(feeds) == len(sess.get_inputs()):
            sess.run(None, feeds)
    except Exception as exc:
        raise AssertionError(f"seed {seed} ({'+'.join(applied)}): quantized model is broken: {exc}") from exc
    return "ok"


def _run_fuzz(tmp_path: Path, seeds) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for seed in seeds:
        folder = tmp_path / str(seed)
        folder.mkdir()
        outcome = fuzz_one(seed, folder)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def test_fuzz_only_ortq_errors_escape(tmp_path):
    # A fixed set of seeds: the same models on every machine, however fast.
    outcomes = _run_fuzz(tmp_path, range(200))
    assert sum(outcomes.values()) == 200, outcomes
    print("fuzz outcomes:", outcomes)


@pytest.mark.slow
def test_fuzz_500_models(tmp_path):
    outcomes = _run_fuzz(tmp_path, range(1000, 1500))
    assert sum(outcomes.values()) == 500
    print("fuzz outcomes (500 models):", outcomes)


@pytest.mark.parametrize("seed", [3, 17, 42, 99, 123])
def test_fuzz_cli_never_prints_a_traceback(seed, tmp_path, capfd):
    path, cal, applied = make_case(seed, tmp_path)
    code = main(["-q", "quantize", str(path), "-o", str(tmp_path / "out"), "--calibration-data", str(cal)])
    err = capfd.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (seed, applied, lines)
        assert not (tmp_path / "out").exists()
