"""Bad input and faults: every case ends in one ortq error (typed in the API, one ``error:`` line from the CLI),
with no output, no temporary file left behind, and the inputs untouched.

Cases that cannot happen for real in a test run are simulated and say so: the process runs as root (which
ignores permission bits), so "not writable" patches ``os.access`` / ``tempfile.mkdtemp``; "disk full" makes
the writing functions raise ``OSError(ENOSPC)``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from ortq import AutoQuantizationConfig
from ortq.cli import main
from ortq.config import CalibrationConfig, QuantizationConfig, WeightOnlyConfig
from ortq.errors import (
    CalibrationDataError,
    ConfigError,
    ModelError,
    OrtqError,
    OutputError,
)
from ortq.quantizer import ORTQuantizer

RNG = np.random.default_rng(0)


def _small_model(opset: int = 17) -> onnx.ModelProto:
    w1 = RNG.standard_normal((8, 16)).astype(np.float32)
    w2 = RNG.standard_normal((16, 4)).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        h.make_node("Relu", ["h"], ["r"], name="relu"),
        h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    graph = h.make_graph(
        nodes, "small", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], [nh.from_array(w1, "W1"), nh.from_array(w2, "W2")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@dataclass
class Ctx:
    """A fresh work folder: ``model/model.onnx`` (no tokenizer), ``cal.npz``, an output path, a TMPDIR."""

    root: Path
    model_dir: Path
    model: Path
    cal: Path
    out: Path
    tmpdir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def write_npz(self, name: str, **arrays: np.ndarray) -> Path:
        p = self.root / name
        np.savez(p, **arrays)
        return p


@pytest.fixture
def ctx(tmp_path, monkeypatch) -> Ctx:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(_small_model(), model_dir / "model.onnx")
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=RNG.standard_normal((40, 8)).astype(np.float32))
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return Ctx(tmp_path, model_dir, model_dir / "model.onnx", cal, tmp_path / "out", tmpdir)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(c: Ctx) -> list[str]:
    """Temporary files or folders ortq may have left: beside the output, and in TMPDIR."""
    left = [p.name for p in c.out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    # onnxruntime itself keeps one marker in TMPDIR (``.ses``, its telemetry session's first-launch time,
    # written once per process and meant to persist); it is not a temporary file of ortq's.
    left += [p.name for p in c.tmpdir.iterdir() if p.name != ".ses"]
    return left


def _cli(argv: list[str], capfd) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capfd.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, match: str) -> str:
    import re

    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    assert re.search(match, lines[0]), (match, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------- the cases

# Each setup prepares the bad input in ``c`` and returns the quantize arguments: input, output, data (None: no
# --calibration-data), overwrite, num_samples. The same case runs through the CLI and through the Python API.


def _missing_model(c):
    return {"input": c.root / "nope.onnx"}


def _folder_without_model(c):
    empty = c.root / "empty_folder"
    empty.mkdir()
    return {"input": empty}


def _truncated_model(c):
    data = c.model.read_bytes()
    p = c.root / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    return {"input": p}


def _random_bytes_model(c):
    p = c.root / "random.onnx"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"input": p}


def _empty_model_file(c):
    p = c.root / "empty.onnx"
    p.write_bytes(b"")
    return {"input": p}


def _text_file_as_model(c):
    p = c.root / "notes.onnx"
    p.write_text("this is not a model\n" * 20)
    return {"input": p}


def _external_data_missing(c):
    folder = c.root / "ext"
    folder.mkdir()
    onnx.save(_small_model(), folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    (folder / "weights.bin").unlink()
    return {"input": folder}


def _invalid_graph(c):
    m = _small_model()
    m.graph.node[1].input[0] = "undefined_tensor"
    p = c.root / "invalid.onnx"
    onnx.save(m, p)
    return {"input": p}


def _no_default_opset(c):
    m = _small_model()
    del m.opset_import[:]
    m.opset_import.append(h.make_opsetid("com.example", 1))
    p = c.root / "no-opset.onnx"
    onnx.save(m, p)
    return {"input": p}


def _unknown_future_opset(c):
    m = _small_model(opset=17)
    m.opset_import[0].version = 99
    p = c.root / "opset99.onnx"
    onnx.save(m, p)
    return {"input": p}


def _nothing_to_quantize(c):
    graph = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    p = c.root / "relu.onnx"
    onnx.save(m, p)
    return {"input": p}


def _calibration_missing(c):
    return {"data": c.root / "missing.npz"}


def _calibration_empty_txt(c):
    p = c.root / "empty.txt"
    p.write_text("\n\n")
    (c.model_dir / "tokenizer_config.json").write_text("{}")  # text path reaches the emptiness check first
    return {"data": p}


def _calibration_empty_npz(c):
    p = c.root / "none.npz"
    np.savez(p)
    return {"data": p}


def _calibration_zero_samples(c):
    return {"data": c.write_npz("zero.npz", x=np.zeros((0, 8), np.float32))}


def _calibration_wrong_format(c):
    p = c.root / "data.xlsx"
    p.write_bytes(b"PK\x03\x04 not really")
    return {"data": p}


def _calibration_corrupt_npz(c):
    p = c.root / "corrupt.npz"
    p.write_bytes(b"PK\x03\x04" + bytes(200))
    return {"data": p}


def _calibration_bad_jsonl(c):
    p = c.root / "bad.jsonl"
    p.write_text('{"x": [1, 2]}\n{"x": [1, \n')
    return {"data": p}


def _calibration_jsonl_no_columns(c):
    p = c.root / "cols.jsonl"
    p.write_text('{"label": 1}\n{"label": 0}\n')
    return {"data": p}


def _calibration_is_folder(c):
    return {"data": c.model_dir}


def _calibration_not_utf8(c):
    p = c.root / "latin.txt"
    p.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return {"data": p}


def _wrong_input_name(c):
    return {"data": c.write_npz("names.npz", input_ids=np.zeros((4, 8), np.float32))}


def _extra_input_name(c):
    return {"data": c.write_npz("extra.npz", x=np.zeros((4, 8), np.float32), y=np.zeros((4, 8), np.float32))}


def _wrong_dtype(c):
    return {"data": c.write_npz("dtype.npz", x=np.zeros((4, 8), np.int32))}


def _string_dtype(c):
    return {"data": c.write_npz("str.npz", x=np.array([["a"] * 8] * 4))}


def _wrong_rank(c):
    return {"data": c.write_npz("rank.npz", x=np.zeros((4, 2, 8), np.float32))}


def _wrong_inner_dim(c):
    return {"data": c.write_npz("dim.npz", x=np.zeros((4, 7), np.float32))}


def _nan_in_data(c):
    x = RNG.standard_normal((16, 8)).astype(np.float32)
    x[3, 2] = np.nan
    return {"data": c.write_npz("nan.npz", x=x)}


def _inf_in_data(c):
    x = RNG.standard_normal((16, 8)).astype(np.float32)
    x[5, 0] = np.inf
    return {"data": c.write_npz("inf.npz", x=x)}


def _text_without_tokenizer(c):
    p = c.root / "sentences.txt"
    p.write_text("a first sentence\na second one\n")
    return {"data": p}


def _no_calibration_data_no_tokenizer(c):
    return {"data": None}


def _output_equals_input_folder(c):
    return {"output": c.model_dir, "overwrite": True}


def _output_equals_input_file(c):
    return {"output": c.model, "overwrite": True}


def _output_exists(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("precious")
    return {}


def _output_is_a_file(c):
    c.out.write_text("a file")
    return {"overwrite": True}


def _output_parent_is_a_file(c):
    blocker = c.root / "blocker"
    blocker.write_text("x")
    c.extra["out"] = blocker / "sub" / "out"
    return {"output": blocker / "sub" / "out"}


def _output_not_writable(c, monkeypatch):
    # Simulated: tests run as root, which ignores permission bits, so the access check itself is patched.
    real = os.access
    parent = str(c.out.parent.absolute())
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == parent else real(p, mode, **kw))
    return {}


def _in_output_tmp(c: Ctx, path) -> bool:
    """Whether ``path`` is inside the temporary folder ortq writes the output to (beside the output)."""
    p = Path(path).absolute()
    return p.parent.parent == c.out.parent.absolute() and p.parent.name.startswith(f".{c.out.name}.tmp-")


def _output_mkdtemp_denied(c, monkeypatch):
    # Simulated: the temporary folder beside the output cannot be created (read-only filesystem there).
    real = tempfile.mkdtemp

    def deny(*args, **kwargs):
        if Path(kwargs.get("dir") or tempfile.gettempdir()).absolute() == c.out.parent.absolute():
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", deny)
    return {}


def _full_output_disk(c, monkeypatch):
    # Simulated: the output's filesystem is full; the model write fails with ENOSPC halfway (a partial file
    # exists in the temporary folder). Writes elsewhere work.
    import onnx_ir

    real = onnx_ir.save

    def full(model, path, *args, **kwargs):
        if _in_output_tmp(c, path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx_ir, "save", full)


def _disk_full_on_model(c, monkeypatch):
    _full_output_disk(c, monkeypatch)
    return {}


def _disk_full_on_rename(c, monkeypatch):
    # Simulated: everything is written, the final rename into place fails with ENOSPC.
    real = os.replace

    def full(src, dst, *args, **kwargs):
        if Path(dst).absolute() == c.out.absolute():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    return {}


def _disk_full_on_side_file(c, monkeypatch):
    # Simulated: the JSON report cannot be written.
    import ortq.quantize_steps as steps_module

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(steps_module, "write_text_atomic", full)
    return {}


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[..., dict[str, Any]]
    error: type[OrtqError]
    match: str
    api_error: type[OrtqError] | None = None  # when the API reports it with another type
    api_match: str | None = None
    needs_monkeypatch: bool = False


CASES = [
    Case("missing-model", _missing_model, ModelError, "no such file or folder"),
    Case("folder-without-model", _folder_without_model, ModelError, "holds no model.onnx"),
    Case("truncated-onnx", _truncated_model, ModelError, "not a readable ONNX model|invalid ONNX model|no nodes"),
    Case("random-bytes-onnx", _random_bytes_model, ModelError, "not a readable ONNX model|invalid ONNX|no nodes"),
    Case("empty-onnx-file", _empty_model_file, ModelError, "no nodes|not a readable"),
    Case("text-file-as-onnx", _text_file_as_model, ModelError, "not a readable ONNX model|invalid ONNX|no nodes"),
    Case("external-data-missing", _external_data_missing, ModelError, "external data"),
    Case("invalid-graph", _invalid_graph, ModelError, "invalid ONNX model"),
    Case("no-default-opset", _no_default_opset, ModelError, "no default-domain|invalid ONNX model"),
    Case("unknown-future-opset", _unknown_future_opset, ModelError, "opset 99 is newer than onnx"),
    Case("nothing-to-quantize", _nothing_to_quantize, ModelError, "nothing to quantize"),
    Case("calibration-missing", _calibration_missing, CalibrationDataError, "missing.npz: no such file"),
    Case("calibration-empty-txt", _calibration_empty_txt, CalibrationDataError, "no samples"),
    Case("calibration-empty-npz", _calibration_empty_npz, CalibrationDataError, "no arrays"),
    Case("calibration-zero-samples", _calibration_zero_samples, CalibrationDataError, "no samples"),
    Case("calibration-wrong-format", _calibration_wrong_format, CalibrationDataError, "unsupported data format"),
    Case("calibration-corrupt-npz", _calibration_corrupt_npz, CalibrationDataError, "not a readable .npz"),
    Case("calibration-bad-jsonl", _calibration_bad_jsonl, CalibrationDataError, r"bad.jsonl:2: invalid JSON"),
    Case("calibration-jsonl-no-columns", _calibration_jsonl_no_columns, CalibrationDataError, "'text' column"),
    Case("calibration-is-folder", _calibration_is_folder, CalibrationDataError, "is a folder"),
    Case("calibration-not-utf8", _calibration_not_utf8, CalibrationDataError, "not UTF-8"),
    Case("wrong-input-name", _wrong_input_name, CalibrationDataError, "missing input.*x.*unknown input.*input_ids"),
    Case("extra-input-name", _extra_input_name, CalibrationDataError, "unknown input.*y"),
    Case("wrong-dtype", _wrong_dtype, CalibrationDataError, "dtype int32, the graph expects float32"),
    Case("string-dtype", _string_dtype, CalibrationDataError, "dtype <U1, the graph expects float32"),
    Case("wrong-rank", _wrong_rank, CalibrationDataError, "rank 3, the graph expects 2"),
    Case("wrong-inner-dim", _wrong_inner_dim, CalibrationDataError, "onnxruntime failed on a calibration batch"),
    Case("nan-in-data", _nan_in_data, CalibrationDataError, "NaN or infinite"),
    Case("inf-in-data", _inf_in_data, CalibrationDataError, "NaN or infinite"),
    Case("text-without-tokenizer", _text_without_tokenizer, CalibrationDataError, "needs a tokenizer"),
    Case("no-data-no-tokenizer", _no_calibration_data_no_tokenizer, ConfigError, "--calibration-data is required",
         api_error=CalibrationDataError, api_match="needs activation ranges"),
    Case("output-equals-input-folder", _output_equals_input_folder, OutputError, "output equals the input"),
    Case("output-equals-input-file", _output_equals_input_file, OutputError, "output equals the input"),
    Case("output-exists", _output_exists, OutputError, "exists and is not empty; pass --overwrite"),
    Case("output-is-a-file", _output_is_a_file, OutputError, "exists and is not a folder"),
    Case("output-parent-is-a-file", _output_parent_is_a_file, OutputError, "cannot create parent folder"),
    Case("output-not-writable", _output_not_writable, OutputError, "is not writable", needs_monkeypatch=True),
    Case("output-tempdir-denied", _output_mkdtemp_denied, OutputError, "cannot write here",
         needs_monkeypatch=True),
    Case("disk-full-model", _disk_full_on_model, OutputError, "no space left on device; nothing was written",
         needs_monkeypatch=True),
    Case("disk-full-rename", _disk_full_on_rename, OutputError, "no space left on device; nothing was written",
         needs_monkeypatch=True),
    Case("disk-full-side-file", _disk_full_on_side_file, OutputError, "no space left on device",
         needs_monkeypatch=True),
]


def _prepare(case: Case, c: Ctx, monkeypatch) -> dict[str, Any]:
    args = case.setup(c, monkeypatch) if case.needs_monkeypatch else case.setup(c)
    full = {"input": c.model_dir, "output": c.out, "data": c.cal, "overwrite": False, "num_samples": None}
    full.update(args)
    return full


def _check_nothing_left(c: Ctx, args: dict[str, Any], before: dict[str, str], out_before: bool) -> None:
    assert _digest(c.model_dir) == before, "the input folder changed"
    assert _leftovers(c) == [], _leftovers(c)
    out = Path(args["output"])
    if not out_before and out != c.model_dir and out != c.model:
        assert not out.exists(), f"{out} was created"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_one_line_error(case, ctx, capfd, monkeypatch):
    before = _digest(ctx.model_dir)
    out_before = ctx.out.exists()
    args = _prepare(case, ctx, monkeypatch)
    before = _digest(ctx.model_dir)
    out_before = Path(args["output"]).exists()
    argv = ["-q", "quantize", args["input"], "--output", args["output"]]
    if args["data"] is not None:
        argv += ["--calibration-data", args["data"]]
    if args["overwrite"]:
        argv += ["--overwrite"]
    code, err = _cli(argv, capfd)
    assert_one_line_error(code, err, case.match)
    assert code == case.error.exit_code
    _check_nothing_left(ctx, args, before, out_before)
    if case.id == "output-exists":
        assert (ctx.out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api_typed_error(case, ctx, monkeypatch):
    args = _prepare(case, ctx, monkeypatch)
    before = _digest(ctx.model_dir)
    out_before = Path(args["output"]).exists()
    error, match = case.api_error or case.error, case.api_match or case.match
    with pytest.raises(error, match=match) as info:
        q = ORTQuantizer.from_pretrained(args["input"])
        q.quantize(
            AutoQuantizationConfig.avx2(),
            args["output"],
            calibration_data=args["data"],
            calibration_config=CalibrationConfig(batch_size=8),
            overwrite=args["overwrite"],
        )
    assert "\n" not in str(info.value)
    _check_nothing_left(ctx, args, before, out_before)


# ------------------------------------------------------------------------------ usage and config values


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--num-samples", "0"], "expected a positive integer, got '0'"),
        (["--num-samples", "-5"], "expected a positive integer"),
        (["--batch-size", "many"], "expected a positive integer, got 'many'"),
        (["--method", "magic"], "invalid choice: 'magic'"),
        (["--preset", "quantum"], "invalid choice: 'quantum'"),
        (["--smooth-quant", "2"], r"smooth_quant_alpha must be .*in \[0, 1\]"),
        (["--smooth-quant", "lots"], "expected a number"),
        (["--weight-only", "int4", "--block-size", "24"], "block_size must be a power of two"),
        (["--weight-only", "int3"], "invalid choice: 'int3'"),
        (["--weight-only", "int4", "--algorithm", "awq"], "invalid choice: 'awq'"),
        (["--weight-only", "int4", "--algorithm", "magic"], "invalid choice: 'magic'"),
        (["--operators", ","], "operators_to_quantize is empty"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_cli_invalid_values(extra, match, ctx, capfd):
    code, err = _cli(["quantize", ctx.model_dir, "-o", ctx.out, "--calibration-data", ctx.cal, *extra], capfd)
    assert_one_line_error(code, err, match)
    assert not ctx.out.exists() and _leftovers(ctx) == []


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CalibrationConfig(num_samples=0), "num_samples must be a positive integer"),
        (lambda: CalibrationConfig(batch_size=-1), "batch_size must be a positive integer"),
        (lambda: CalibrationConfig(percentile=200.0), r"percentile must be in \(0, 100\]"),
        (lambda: CalibrationConfig(num_bins=3), "num_bins must be an integer >= 16"),
        (lambda: CalibrationConfig(method="median"), "invalid calibration method 'median'"),
        (lambda: QuantizationConfig(activations_dtype="int16"), "invalid activations dtype 'int16'"),
        (lambda: QuantizationConfig(operators_to_quantize=()), "operators_to_quantize is empty"),
        (lambda: QuantizationConfig(weights_granularity="per_row"), "weights_granularity must be"),
        (lambda: WeightOnlyConfig(bits=3), "bits must be 4 or 8"),
        (lambda: WeightOnlyConfig(block_size=0), "block_size must be a power of two"),
        (lambda: AutoQuantizationConfig.from_name("quantum"), "unknown preset 'quantum'"),
        (lambda: QuantizationConfig.from_dict({"reduce_rnage": True}), r"unknown QuantizationConfig key\(s\)"),
    ],
)
def test_api_invalid_config_values(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_quantize_without_save_dir_or_with_a_wrong_config(ctx):
    q = ORTQuantizer.from_pretrained(ctx.model_dir)
    with pytest.raises(ConfigError, match="needs save_dir"):
        q.quantize(AutoQuantizationConfig.avx2(), None)
    with pytest.raises(ConfigError, match="unsupported quantization config dict"):
        q.quantize({"preset": "avx2"}, ctx.out)
    assert not ctx.out.exists()


def test_api_num_samples_zero_is_refused_before_any_work(ctx):
    from ortq.data import load_batches

    with pytest.raises(CalibrationDataError, match="num_samples must be a positive integer"):
        load_batches(ctx.cal, model=ctx.model, num_samples=0)


def test_corrupt_calibration_state(ctx):
    bad = ctx.root / "state.npz"
    bad.write_bytes(b"not a state")
    q = ORTQuantizer.from_pretrained(ctx.model_dir)
    with pytest.raises(CalibrationDataError, match="not an ortq calibration state"):
        q.load_calibration_state(bad, CalibrationConfig())
    with pytest.raises(CalibrationDataError, match="no such calibration state file"):
        q.load_calibration_state(ctx.root / "missing.npz", CalibrationConfig())


def test_overwrite_replaces_atomically_and_keeps_old_on_failure(ctx, capfd, monkeypatch):
    """With --overwrite, a failure while writing leaves the previous output exactly as it was."""
    assert main(["-q", "quantize", str(ctx.model_dir), "-o", str(ctx.out), "--calibration-data", str(ctx.cal)]) == 0
    capfd.readouterr()
    first = _digest(ctx.out)

    _full_output_disk(ctx, monkeypatch)
    code, err = _cli(["-q", "quantize", ctx.model_dir, "-o", ctx.out, "--calibration-data", ctx.cal,
                      "--overwrite"], capfd)
    assert_one_line_error(code, err, "no space left on device")
    assert _digest(ctx.out) == first
    assert _leftovers(ctx) == []


def test_debug_flag_shows_the_traceback(ctx):
    with pytest.raises(ModelError):
        main(["--debug", "quantize", str(ctx.root / "nope.onnx"), "-o", str(ctx.out), "--calibration-data",
              str(ctx.cal)])


def test_internal_errors_are_one_line_too(ctx, capfd, monkeypatch):
    """A bug (any non-ortq exception) still ends in one line, pointing at --debug."""
    import ortq.quantize_steps as steps_module

    def boom(*args, **kwargs):
        raise RuntimeError("unexpected\nsecond line")

    monkeypatch.setattr(steps_module, "make_plan", boom)
    code, err = _cli(["-q", "quantize", ctx.model_dir, "-o", ctx.out, "--calibration-data", ctx.cal], capfd)
    assert_one_line_error(code, err, r"internal error \(RuntimeError: unexpected\); rerun with --debug")
    assert not ctx.out.exists() and _leftovers(ctx) == []
