"""ortq.export: parity with torch, dynamic axes, folder contents, atomic output, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from ortq.errors import ConfigError, ExportError, OutputError
from ortq.export import ExportResult, export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS_A = ["a short one", "the second sentence is noticeably longer than the first one, with commas"]
TEXTS_B = ["one", "two words", "three words here", "and four words now", "five is the last of them"]


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _feeds(folder, texts, input_names):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tok(texts, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    values = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None),
    }
    return {n: values[n] for n in input_names}, mask.astype(bool)


def _torch_ref(src, task, feeds):
    cls = {
        "feature-extraction": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm-no-past": transformers.AutoModelForCausalLM,
    }[task]
    model = cls.from_pretrained(str(src), attn_implementation="eager").eval()
    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    if task == "causal-lm-no-past":
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    return (out.logits if task != "feature-extraction" else out.last_hidden_state).numpy()


CASES = [
    (
        "tiny_bert_src",
        "tiny_bert_dir",
        "feature-extraction",
        ["input_ids", "attention_mask", "token_type_ids"],
    ),
    (
        "tiny_bert_classifier_src",
        "tiny_bert_classifier_dir",
        "text-classification",
        ["input_ids", "attention_mask", "token_type_ids"],
    ),
    (
        "tiny_llama_src",
        "tiny_llama_nopast_dir",
        "causal-lm-no-past",
        ["input_ids", "attention_mask", "position_ids"],
    ),
]


@pytest.mark.parametrize(("src_fixture", "dir_fixture", "task", "inputs"), CASES, ids=[c[2] for c in CASES])
def test_exported_folder_matches_torch_on_two_shapes(request, src_fixture, dir_fixture, task, inputs):
    src, folder = request.getfixturevalue(src_fixture), request.getfixturevalue(dir_fixture)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == inputs
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ortq.task"] == task
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*")), "no temp files left behind"
    # The batch and sequence axes are symbolic in the graph ...
    for vi in list(model.graph.input) + list(model.graph.output)[:1]:
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, vi.name
    # ... and really dynamic: two batch sizes and two sequence lengths, neither the traced one.
    sess = _session(folder)
    shapes = set()
    for texts in (TEXTS_A, TEXTS_B):
        feeds, mask = _feeds(folder, texts, inputs)
        got = sess.run(None, feeds)[0]
        ref = _torch_ref(src, task, feeds)
        assert got.shape == ref.shape
        if got.ndim == 3:
            got, ref = got[mask], ref[mask]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        shapes.add(feeds["input_ids"].shape)
    assert len(shapes) == 2


def test_export_result_reports_parity(tiny_bert_src, tmp_out):
    result = export(tiny_bert_src, tmp_out, max_length=64)
    assert isinstance(result, ExportResult)
    assert result.task == "feature-extraction"
    assert result.exporter == "torchscript"
    assert result.model_path == tmp_out.absolute() / "model.onnx"
    assert result.path == result.output_dir == tmp_out.absolute()
    assert result.output_names == ("last_hidden_state",)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert result.max_rel_diff < 1e-5
    assert len(result.parity_shapes) == 2 and len(set(result.parity_shapes)) == 2
    assert not result.external_data
    assert "model.onnx" in result.files and "config.json" in result.files
    meta = {p.key: p.value for p in onnx.load(str(result.model_path)).metadata_props}
    assert meta["ortq.max_length"] == "64"


def test_no_identity_nodes_on_weights(tiny_bert_dir):
    # Random init makes many LayerNorm weights / biases equal; the exporter would route copies via Identity.
    model = onnx.load(str(tiny_bert_dir / "model.onnx"))
    inits = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]


def test_tied_lm_head_is_recorded(tiny_llama_dir):
    model = onnx.load(str(tiny_llama_dir / "model.onnx"))
    tied = json.loads({p.key: p.value for p in model.metadata_props}["ortq.tied_weights"])
    assert len(tied) == 1
    ((head, emb),) = tied.items()
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(inits[head], inits[emb].T)
    consumers = {n.op_type for n in model.graph.node if head in n.input}
    assert consumers == {"MatMul"}
    assert {n.op_type for n in model.graph.node if emb in n.input} == {"Gather"}


def test_causal_lm_saves_generation_config(tiny_llama_dir):
    assert (tiny_llama_dir / "generation_config.json").is_file()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_task_override_exports_the_base_model(tiny_bert_classifier_src, tmp_out):
    result = export(tiny_bert_classifier_src, tmp_out, task="feature-extraction", check_parity=False)
    assert result.output_names == ("last_hidden_state",)
    assert result.max_abs_diff is None


# ----------------------------------------------------------------------------------------- plain modules


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_module_export_has_dynamic_batch(tmp_out):
    result = export(_MLP(), tmp_out, example_inputs=torch.randn(2, 8))
    assert result.task is None and result.input_names == ("input",) and result.output_names == ("output",)
    assert result.max_abs_diff < 1e-5
    assert result.files == ("model.onnx",)
    onnx.checker.check_model(onnx.load(str(result.model_path)), full_check=True)
    x = np.random.default_rng(0).standard_normal((5, 8), dtype=np.float32)
    got = _session(tmp_out).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = _MLP()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


class _TwoInputs(torch.nn.Module):
    def forward(self, x, scale):
        return x * scale, x.sum(-1)


def test_module_export_with_dict_inputs_and_names(tmp_out):
    inputs = {"x": torch.randn(3, 4), "scale": torch.randn(3, 1)}
    result = export(_TwoInputs(), tmp_out, example_inputs=inputs, output_names=["scaled", "total"])
    assert result.input_names == ("x", "scale")
    assert result.output_names == ("scaled", "total")
    got = _session(tmp_out).run(
        None, {"x": np.ones((2, 4), np.float32), "scale": np.full((2, 1), 2, np.float32)}
    )
    np.testing.assert_array_equal(got[0], np.full((2, 4), 2))
    np.testing.assert_array_equal(got[1], np.full((2,), 4))


class _TracingDiffers(torch.nn.Module):
    """Exports a graph that computes something else than eager torch: parity must catch it."""

    def forward(self, x):
        return x * 2 if torch.jit.is_tracing() else x


def test_parity_failure_raises_and_writes_nothing(tmp_out):
    with pytest.raises(ExportError, match="differs from torch"):
        export(_TracingDiffers(), tmp_out, example_inputs=torch.randn(2, 3) + 5)
    assert not tmp_out.exists()
    assert list(tmp_out.parent.iterdir()) == [], "temp folder removed"


def test_module_needs_example_inputs(tmp_out):
    with pytest.raises(ConfigError, match="example_inputs"):
        export(_MLP(), tmp_out)


# ----------------------------------------------------------------------------------------- output handling


def test_refuses_non_empty_output_without_overwrite(tmp_out):
    tmp_out.mkdir()
    (tmp_out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="overwrite"):
        export(_MLP(), tmp_out, example_inputs=torch.randn(2, 8))
    assert (tmp_out / "keep.txt").read_text() == "mine"
    export(_MLP(), tmp_out, example_inputs=torch.randn(2, 8), overwrite=True)
    assert sorted(p.name for p in tmp_out.iterdir()) == ["model.onnx"]


def test_empty_existing_output_is_fine(tmp_out):
    tmp_out.mkdir()
    export(_MLP(), tmp_out, example_inputs=torch.randn(2, 8))
    assert (tmp_out / "model.onnx").is_file()


def test_failure_keeps_previous_output(tmp_out, monkeypatch):
    export(_MLP(), tmp_out, example_inputs=torch.randn(2, 8))
    before = (tmp_out / "model.onnx").read_bytes()

    def boom(*args, **kwargs):
        raise ExportError("simulated failure after the graph was written")

    monkeypatch.setattr("ortq.export.compare_with_torch", boom)
    with pytest.raises(ExportError, match="simulated"):
        export(_TwoInputs(), tmp_out, example_inputs=(torch.randn(2, 3), torch.randn(2, 1)), overwrite=True)
    assert (tmp_out / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_out.parent.iterdir()) == ["out"], "no temp folder left"


def test_output_equal_to_source_is_refused(tiny_bert_src):
    with pytest.raises(OutputError, match="equals the input"):
        export(tiny_bert_src, tiny_bert_src, overwrite=True)


# ----------------------------------------------------------------------------------------- errors


def test_missing_folder_raises_export_error(tmp_path, tmp_out):
    with pytest.raises(ExportError, match="no such model folder"):
        export(tmp_path / "nope", tmp_out)
    assert not tmp_out.exists()


def test_folder_without_config_raises(tmp_path, tmp_out):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="config.json"):
        export(tmp_path / "empty", tmp_out)


def test_uncached_hub_name_is_never_downloaded(tmp_out):
    with pytest.raises(ExportError, match="never downloads"):
        export("ortq-tests/not-a-cached-model", tmp_out)
    assert not tmp_out.exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"task": "translation"}, "unknown task"), ({"opset": 7}, "opset"), ({"exporter": "x"}, "exporter")],
)
def test_bad_arguments(tiny_bert_src, tmp_out, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        export(tiny_bert_src, tmp_out, **kwargs)


# ----------------------------------------------------------------------------------------- slow: real models


@pytest.mark.slow
def test_dynamo_exporter_matches_torch(tiny_bert_src, tmp_out):
    result = export(tiny_bert_src, tmp_out, exporter="dynamo")
    assert result.exporter == "dynamo"
    assert result.max_abs_diff < 1e-4
    onnx.checker.check_model(str(result.model_path))


@pytest.mark.slow
def test_minilm_export_parity(minilm_src, minilm_dir):
    model = onnx.load(str(minilm_dir / "model.onnx"))
    onnx.checker.check_model(model)
    assert not [n for n in model.graph.node if n.op_type in ("IsNaN", "Identity")]
    feeds, mask = _feeds(minilm_dir, TEXTS_B, ["input_ids", "attention_mask", "token_type_ids"])
    got = _session(minilm_dir).run(None, feeds)[0]
    ref = _torch_ref(minilm_src, "feature-extraction", feeds)
    assert np.abs(got - ref)[mask].max() < 1e-4


@pytest.mark.slow
def test_smollm2_export_parity(smollm2_gguf, tmp_out):
    result = export(smollm2_gguf, tmp_out)
    assert result.task == "causal-lm"
    past = tuple(f"past_key_values.{i}.{kv}" for i in range(30) for kv in ("key", "value"))
    assert result.input_names == ("input_ids", "attention_mask", "position_ids", *past)
    assert result.max_rel_diff < 1e-4
    assert list(result.tied_weights.values()) == ["model.model.embed_tokens.weight"]
    config = json.loads((tmp_out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_out / "tokenizer.json").is_file()
    onnx.checker.check_model(str(result.model_path))


def test_deberta_without_token_types_exports_the_inputs_it_reads(tmp_path):
    from conftest import _save_source, _tokenizer

    tok = _tokenizer()
    config = transformers.DebertaV2Config(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        type_vocab_size=0, max_position_embeddings=128, relative_attention=True, position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
    )
    config.architectures = ["DebertaV2Model"]
    torch.manual_seed(0)
    src = _save_source(transformers.DebertaV2Model(config).eval(), tok, tmp_path / "src")
    result = export(src, tmp_path / "onnx")
    assert result.input_names == ("input_ids", "attention_mask")
    assert result.max_rel_diff < 1e-4
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]


def test_a_task_whose_head_would_be_random_is_refused(tiny_bert_src, tmp_out):
    with pytest.raises(ExportError, match=r"no weights for .* of task causal-lm .* would be random.*feature-extraction"):
        export(tiny_bert_src, tmp_out, task="causal-lm")
    assert not tmp_out.exists()

