"""What a new user reads: every option explains itself, recipes are listed, errors point the right way."""

import argparse
import sys

import pytest

from ortq import progress
from ortq.cli import build_parser, main
from ortq.recipes import list_recipes


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["export", "quantize", "validate", "run"])
def test_every_option_has_help(command):
    sub = _subparsers(build_parser())[command]
    missing = [a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []


def test_run_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in list_recipes():
        assert name in out


def test_tasks_accept_aliases_and_reject_unknown(capsys):
    args = build_parser().parse_args(["validate", "q.onnx", "--reference", "r.onnx", "--task", "embeddings"])
    assert args.task == "feature-extraction"
    args = build_parser().parse_args(["validate", "q.onnx", "--reference", "r.onnx", "--task", "none"])
    assert args.task == "none"
    with pytest.raises(SystemExit) as exc:
        main(["export", "m", "-o", "o", "--task", "speech"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'speech'" in err[0]


def test_exporting_an_onnx_folder_says_what_to_run(tiny_bert_dir, tmp_path, capsys):
    assert main(["export", str(tiny_bert_dir), "-o", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "already an ONNX model" in err[0] and "ortq quantize" in err[0]
    assert not (tmp_path / "out").exists()


def test_quiet_turns_every_progress_bar_off(monkeypatch, tmp_path):
    monkeypatch.setattr(progress, "_enabled", True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.progress(range(3), desc="x").disable is False
    assert main(["-q", "quantize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out")]) != 0
    assert progress.enabled() is False
    assert progress.progress(range(3), desc="x").disable is True


def test_bars_are_not_drawn_into_a_log_file(monkeypatch):
    monkeypatch.setattr(progress, "_enabled", True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.progress(range(3), desc="x").disable is True
