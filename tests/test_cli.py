import json

import onnx
import pytest

from ortq.cli import main


def test_quantize_and_validate_forms(tiny_bert_dir, tmp_path, capsys):
    data = tmp_path / "cal.txt"
    from ortq.data import real_text

    data.write_text("\n".join(real_text("calibration", 48)))
    out = tmp_path / "int8"
    assert main(["quantize", str(tiny_bert_dir), "--output", str(out), "--calibration-data", str(data)]) == 0
    onnx.checker.check_model(onnx.load(out / "model.onnx"))
    # An .onnx file works as input too (its folder's tokenizer is used for text).
    out2 = tmp_path / "int8b"
    assert main(["quantize", str(tiny_bert_dir / "model.onnx"), "-o", str(out2), "--method", "minmax",
                 "--num-samples", "32"]) == 0
    report_dir = tmp_path / "report"
    code = main(["validate", str(out), "--reference", str(tiny_bert_dir), "--num-samples", "32",
                 "--report-dir", str(report_dir), "--latency-runs", "2"])
    assert code == 0
    doc = json.loads((report_dir / "report.json").read_text())
    assert doc["providers"][0]["status"] == "ok"
    # A threshold above what the model reaches fails the command.
    code = main(["validate", str(out), "--reference", str(tiny_bert_dir), "--num-samples", "16",
                 "--min-sqnr", "200", "--latency-runs", "0"])
    assert code == 1


def test_weight_only_int4(tiny_bert_dir, tmp_path):
    out = tmp_path / "int4"
    assert main(["quantize", str(tiny_bert_dir), "-o", str(out), "--weight-only", "int4", "--block-size", "32"]) == 0
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert "MatMulNBits" in ops


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "missing.onnx", "-o", "out"],
        ["quantize"],
        ["quantize", "x.onnx", "-o", "out", "--num-samples", "0"],
        ["validate", "a.onnx"],
        ["frobnicate"],
    ],
)
def test_usage_errors_are_one_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_accuracy_budget_and_error_report(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "budget"
    code = main(["-q", "quantize", str(tiny_bert_dir), "-o", str(out), "--max-cosine-drop", "0.001", "--num-samples", "64"])
    assert code == 0
    budget = json.loads((out / "quantization_report.json").read_text())["accuracy_budget"]
    assert budget["met"] is True and budget["kept_float"] == []
    all_int8_drop = budget["chosen"]["cosine_drop"]
    assert 0 < all_int8_drop <= 0.001
    assert "accuracy budget met: True; no node kept in float" in capsys.readouterr().out
    # Half the all-int8 drop: some nodes must stay float, each with the budget as its reason.
    tight = tmp_path / "tight"
    code = main(["-q", "quantize", str(tiny_bert_dir), "-o", str(tight), "--max-cosine-drop", repr(all_int8_drop / 2),
                 "--num-samples", "64"])
    assert code == 0
    report = json.loads((tight / "quantization_report.json").read_text())
    kept = report["accuracy_budget"]["kept_float"]
    assert kept, "a budget below the all-int8 drop keeps nodes in float"
    assert report["accuracy_budget"]["chosen"]["cosine_drop"] <= all_int8_drop / 2
    for name in kept:
        node = next(n for n in report["plan"]["nodes"] if n["name"] == name)
        assert "accuracy budget" in node["reason"]
    assert f"{len(kept)} node(s) kept in float: {', '.join(kept)}" in capsys.readouterr().out
    out2 = tmp_path / "report"
    assert main(["-q", "quantize", str(tiny_bert_dir), "-o", str(out2), "--error-report", "--num-samples", "32"]) == 0
    layers = json.loads((out2 / "layer_report.json").read_text())
    assert layers and (out2 / "layer_report.md").exists()


def test_validate_fails_when_no_requested_provider_ran(tiny_bert_dir, tmp_path, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    out = tmp_path / "int8"
    assert main(["-q", "quantize", str(tiny_bert_dir), "-o", str(out), "--num-samples", "16"]) == 0
    capsys.readouterr()
    code = main(["validate", str(out), "--reference", str(tiny_bert_dir), "--providers", "cuda",
                 "--num-samples", "8", "--latency-runs", "0"])
    captured = capsys.readouterr()
    assert code == 1
    assert "**FAIL**" in captured.out
    assert "error: no requested provider ran, so nothing was validated (cuda:" in captured.err


def test_validate_against_a_different_model_fails(tiny_bert_dir, tiny_bert_classifier_dir, tmp_path, capsys):
    # Same inputs, different weights and head: the reference is not the model this one came from.
    code = main(["validate", str(tiny_bert_classifier_dir), "--reference", str(tiny_bert_dir), "--num-samples", "8",
                 "--latency-runs", "0", "--task", "none"])
    assert code != 0
    assert "error:" in capsys.readouterr().err


def test_weight_only_that_quantizes_nothing_fails_without_output(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from ortq.export import export

    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    export(convnet, tmp_path / "fp32", example_inputs=torch.randn(1, 3, 16, 16))
    capsys.readouterr()
    code = main(["quantize", str(tmp_path / "fp32"), "-o", str(tmp_path / "int4"), "--weight-only", "int4"])
    assert code != 0 and not (tmp_path / "int4").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was quantized: weight-only 4-bit" in err[0]


def test_weight_only_flags_left_unset_keep_the_config_defaults():
    from ortq.cli import _weight_only_config, build_parser
    from ortq.config import WeightOnlyConfig

    def config(*flags):
        args = build_parser().parse_args(["quantize", "m", "-o", "out", "--weight-only", "int4", *flags])
        return _weight_only_config(args)

    default = WeightOnlyConfig()
    got = config()
    assert (got.symmetric, got.keep_source_grid, got.sensitive_budget, got.float16_scales) == (
        default.symmetric, default.keep_source_grid, default.sensitive_budget, default.float16_scales)
    got = config("--no-symmetric", "--keep-source-grid", "--sensitive-budget", "0")
    assert (got.symmetric, got.keep_source_grid, got.sensitive_budget) == (False, True, 0.0)
