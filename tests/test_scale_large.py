"""A 1.1B-parameter Llama (fp32 about 4.4 GB, over protobuf's 2 GB) exported, quantized to int4 and validated,
each step in its own process under GNU ``time -v``, within the memory bound: peak RSS at most S + 1.5 GB (S the
fp32 model on disk). Slow (about 10 minutes on 2 cores, 13 GB of disk): ``pytest -m slow -k scale_large``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BOUND_BYTES = 1.5e9


@pytest.mark.slow
def test_1b_llama_export_int4_validate_within_s_plus_1_5_gb(tmp_path):
    pytest.importorskip("transformers")
    if shutil.which("time") is None and not Path("/usr/bin/time").is_file():
        pytest.skip("GNU time is needed to measure each step's peak RSS")
    if shutil.disk_usage(tmp_path).free < 16e9:
        pytest.skip("needs 16 GB of free disk")
    sys.path.insert(0, str(BENCHMARKS))
    import scale

    src = tmp_path / "hf"
    params = scale._build_llama(src, 1060)
    assert params > 1.0e9
    export = (f"from ortq.export import export; export({str(src)!r}, {str(tmp_path / 'fp32')!r}, "
              "check_parity=False)")
    steps = {"export": scale._timed([sys.executable, "-c", export], tmp_path / "export.log")}
    size = sum(f.stat().st_size for f in (tmp_path / "fp32").glob("model.onnx*"))
    assert size > 2**31
    ortq = [sys.executable, "-c", "import sys; from ortq.cli import main; sys.exit(main(sys.argv[1:]))"]
    steps["int4"] = scale._timed([*ortq, "quantize", str(tmp_path / "fp32"), "--output", str(tmp_path / "int4"),
                                  "--weight-only", "int4", "--algorithm", "rtn"], tmp_path / "int4.log")
    steps["validate"] = scale._timed([*ortq, "validate", str(tmp_path / "int4"), "--reference",
                                      str(tmp_path / "fp32"), "--num-samples", "16", "--no-generative",
                                      "--latency-runs", "2"], tmp_path / "validate.log")
    for name, step in steps.items():
        assert step["rc"] == 0, (name, step["log_tail"])
        assert step["peak_rss_mib"] * 2**20 <= size + BOUND_BYTES, (name, step, size)
