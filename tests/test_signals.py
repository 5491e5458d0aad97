"""SIGINT / SIGTERM in the middle of calibration: exit 130, one ``error:`` line, no output and no temporary file
left, neither beside the output nor in TMPDIR. The CLI runs as a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from ortq.cli import main

REPO = Path(__file__).resolve().parents[1]


def _slow_model(path: Path, width: int = 1024, layers: int = 4) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(nh.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"W{i}"))
        nodes.append(h.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(h.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = h.make_graph(
        nodes, "slow", [h.make_tensor_value_info("x", T.FLOAT, ["N", width])],
        [h.make_tensor_value_info(x, T.FLOAT, ["N", width])], inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    _slow_model(src / "model.onnx")
    # Enough single-sample batches that calibration runs for many seconds: it is always interrupted midway.
    np.savez(src / "cal.npz", x=np.random.default_rng(1).standard_normal((16_000, 1024)).astype(np.float32))
    return src


@pytest.fixture
def work(slow_src, tmp_path):
    src = slow_src
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    return src, outdir, tmpdir


def _run_and_signal(src: Path, outdir: Path, tmpdir: Path, sig: int) -> tuple[int, str]:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "ortq.cli", "quantize", str(src / "model.onnx"), "-o", str(outdir / "int8"),
        "--calibration-data", str(src / "cal.npz"), "--batch-size", "1",
    ]
    # A job started in the background (``cmd &``) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the child gets the default disposition back, as in a terminal.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(outdir),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[bytes] = []
    started = threading.Event()

    def reader():
        while True:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                break
            chunks.append(chunk)
            # No progress bar on a pipe: the log line that calibration starts (16000 batches of 1 take ~4 s: the signal lands mid-run on a loaded machine too).
            if b"calibrating (" in b"".join(chunks[-3:]):
                started.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert started.wait(120), "calibration never started: " + b"".join(chunks).decode(errors="replace")[-2000:]
        time.sleep(0.5)
        assert proc.poll() is None, "calibration finished before the signal"
        proc.send_signal(sig)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t.join(10)
    proc.stdout.close()
    proc.stderr.close()
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_calibration_leaves_nothing(work, sig):
    src, outdir, tmpdir = work
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    code, err = _run_and_signal(src, outdir, tmpdir, sig)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == ["error: interrupted; nothing was written"], lines[-5:]
    assert lines[-1] == errors[0]
    assert list(outdir.iterdir()) == [], "output or temporary folder left beside the output"
    # onnxruntime keeps one persistent marker of its own in TMPDIR (``.ses``); nothing else may remain.
    assert [p.name for p in tmpdir.iterdir() if p.name != ".ses"] == []
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_interrupt_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the final write (in process): the temporary folder goes, the output never appears."""
    src = tmp_path / "m.onnx"
    _slow_model(src, width=32, layers=2)
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32))

    import onnx_ir

    out = tmp_path / "out" / "int8"
    real_save = onnx_ir.save

    def interrupted(model, path, *args, **kwargs):
        if out.parent not in Path(path).parents:
            return real_save(model, path, *args, **kwargs)
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", interrupted)
    code = main(["-q", "quantize", str(src), "-o", str(out), "--calibration-data", str(tmp_path / "cal.npz")])
    assert code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; nothing was written"
    assert list(out.parent.iterdir()) == []


def test_interrupt_during_overwrite_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    src = tmp_path / "m.onnx"
    _slow_model(src, width=32, layers=2)
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32))
    out = tmp_path / "out"
    argv = ["-q", "quantize", str(src), "-o", str(out), "--calibration-data", str(tmp_path / "cal.npz"), "--overwrite"]
    assert main(argv) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def replace(a, b, *args, **kwargs):  # the rename of the old output aside is interrupted
        if Path(b).name.startswith(".out.old-"):
            raise KeyboardInterrupt
        return real_replace(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(argv) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "m.onnx", "out"]
