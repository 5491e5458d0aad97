"""Causal LMs exported with their KV cache: graph layout, parity per decode step, generation that matches
transformers token for token, onnxruntime-genai loading the folder, and the errors a user can cause."""

import json

import numpy as np
import onnx
import pytest

from ortq.cli import main
from ortq.errors import ConfigError, ModelError
from ortq.export import export
from ortq.generate import Generator, SamplingConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [101, 1996, 4248, 2829, 4419, 14523, 2058]


def _hf(src):
    return transformers.AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager").eval()


def _hf_greedy(src, ids, n):
    with torch.no_grad():
        out = _hf(src).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_graph_takes_and_returns_the_cache(tiny_llama_dir):
    model = onnx.load(str(tiny_llama_dir / "model.onnx"))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                      "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in past] == ["batch_size", 2, "past_sequence_length", 8]
    present = next(o for o in model.graph.output if o.name == "present.1.value").type.tensor_type.shape.dim
    assert present[2].dim_param == "total_sequence_length"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ortq.task"] == "causal-lm"
    # Each layer's attention is one fused ONNX Runtime op; no float attention MatMuls are left.
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    genai = json.loads((tiny_llama_dir / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 8)
    assert genai["model"]["context_length"] == 256


def test_logits_match_transformers_at_prefill_and_every_decode_step(tiny_llama_src, tiny_llama_dir):
    gen = Generator(tiny_llama_dir)
    hf = _hf(tiny_llama_src)
    past = [spec.empty_past(1) for spec in gen.past]
    ids = list(PROMPT)
    logits, past = gen.step(np.asarray([ids]), past, 0)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), use_cache=True)
    cache = ref.cache if getattr(ref, "cache", None) is not None else ref.past_key_values
    worst = 0.0
    for _ in range(6):
        want = ref.logits[0, -1].numpy()
        worst = max(worst, float(np.abs(logits[0] - want).max() / np.abs(want).max()))
        token = int(np.argmax(want))
        ids.append(token)
        logits, past = gen.step(np.asarray([[token]]), past, len(ids) - 1)
        with torch.no_grad():
            ref = hf(torch.tensor([[token]]), **{"cache" if hasattr(ref, "cache") else "past_key_values": cache},
                     use_cache=True)
        cache = ref.cache if getattr(ref, "cache", None) is not None else ref.past_key_values
    assert worst <= 1e-3, worst


def test_greedy_generation_is_transformers_token_for_token(tiny_llama_src, tiny_llama_dir):
    result = Generator(tiny_llama_dir).generate(PROMPT, max_new_tokens=24)
    assert result.token_ids == _hf_greedy(tiny_llama_src, PROMPT, len(result.token_ids))
    assert result.prefill_tokens_per_s > 0
    assert result.engine == "ort" and result.prompt_ids == PROMPT


def test_onnxruntime_genai_loads_the_folder_and_generates_the_same_tokens(tiny_llama_dir):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'ortq[llm]')")
    ours = Generator(tiny_llama_dir).generate(PROMPT, max_new_tokens=16)
    theirs = Generator(tiny_llama_dir, engine="genai").generate(PROMPT, max_new_tokens=16)
    assert theirs.token_ids == ours.token_ids


def test_sampling_is_seeded():
    from ortq.generate import _choose

    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    rng = np.random.default_rng
    a = [_choose(logits, SamplingConfig(do_sample=True, seed=1), rng(1)) for _ in range(5)]
    assert a == [_choose(logits, SamplingConfig(do_sample=True, seed=1), rng(1)) for _ in range(5)]
    assert _choose(logits, SamplingConfig(do_sample=True, top_k=1), rng(0)) == 3
    assert _choose(logits, SamplingConfig(do_sample=True, top_p=0.35), rng(0)) == 3
    assert _choose(logits, SamplingConfig(), rng(0)) == 3


def test_generation_errors(tiny_llama_dir, tiny_llama_nopast_dir):
    with pytest.raises(ModelError, match="no KV-cache inputs"):
        Generator(tiny_llama_nopast_dir)
    gen = Generator(tiny_llama_dir)
    with pytest.raises(ConfigError, match="exceed the model's context of 256 tokens"):
        gen.generate(PROMPT, max_new_tokens=250)
    with pytest.raises(ConfigError, match="the model's context is 256 tokens"):
        gen.generate([5] * 300, max_new_tokens=1)
    with pytest.raises(ConfigError, match="empty"):
        gen.generate([], max_new_tokens=1)


def test_cli_generate(tiny_llama_dir, tiny_llama_nopast_dir, capsys):
    assert main(["generate", str(tiny_llama_dir), "--prompt", "the quick brown fox", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "prefill" in err and "tokens/s" in err
    assert main(["generate", str(tiny_llama_nopast_dir), "--prompt", "x"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "export the model with `ortq export MODEL --task causal-lm`" in lines[0]


def _tiny(name):
    from conftest import _tokenizer

    tok = _tokenizer()
    # head_dim 16: ONNX Runtime rotates inside GroupQueryAttention from there, so the fused rotary is covered
    common = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    T = transformers
    configs = {
        "qwen2": lambda: (T.Qwen2Config(num_key_value_heads=2, **common), T.Qwen2ForCausalLM),
        "qwen3": lambda: (T.Qwen3Config(num_key_value_heads=2, head_dim=16, **common), T.Qwen3ForCausalLM),
        "mistral": lambda: (T.MistralConfig(num_key_value_heads=2, **common), T.MistralForCausalLM),
        "phi3": lambda: (T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common), T.Phi3ForCausalLM),
        "gemma": lambda: (T.GemmaConfig(num_key_value_heads=1, head_dim=16, **common), T.GemmaForCausalLM),
        "gpt2": lambda: (T.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128),
                         T.GPT2LMHeadModel),
        "gpt_neox": lambda: (T.GPTNeoXConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=128), T.GPTNeoXForCausalLM),
    }
    config, cls = configs[name]()
    config.architectures = [cls.__name__]
    torch.manual_seed(0)
    return cls(config).eval(), tok


ARCHITECTURES = ["qwen2", "phi3", "gpt2"]
SLOW_ARCHITECTURES = ["qwen3", "mistral", "gemma", "gpt_neox"]


@pytest.mark.parametrize(
    "arch", ARCHITECTURES + [pytest.param(a, marks=pytest.mark.slow) for a in SLOW_ARCHITECTURES]
)
def test_architectures_export_with_past_and_generate_like_transformers(arch, tmp_path):
    from conftest import _save_source

    model, tok = _tiny(arch)
    src = _save_source(model, tok, tmp_path / "src")
    result = export(src, tmp_path / "onnx")
    assert result.task == "causal-lm" and "present.1.value" in result.output_names
    assert result.attention == "GroupQueryAttention"
    assert result.max_rel_diff < 1e-4
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    # the whole-head rotate_half rotations go inside the op; GPT-NeoX rotates a quarter of the head, GPT-2 none
    assert attrs.get("do_rotary", 0) == (arch not in ("gpt2", "gpt_neox"))
    got = Generator(tmp_path / "onnx").generate(PROMPT, max_new_tokens=12)
    assert got.token_ids == _hf_greedy(src, PROMPT, len(got.token_ids))


def test_fused_attention_matches_the_unfused_graph_step_by_step(tiny_llama_src, tiny_llama_dir, tmp_path):
    unfused = export(tiny_llama_src, tmp_path / "unfused", fused_attention=False)
    assert unfused.attention == "standard"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "unfused" / "model.onnx")).graph.node]
    assert "GroupQueryAttention" not in ops and "Softmax" in ops
    fused, plain = Generator(tiny_llama_dir), Generator(tmp_path / "unfused")
    caches = [[spec.empty_past(1) for spec in g.past] for g in (fused, plain)]
    ids = list(PROMPT)
    chunks = [ids, [ids[-1]], [ids[2]], [ids[3], ids[4], ids[5]]]
    seen = 0
    for chunk in chunks:
        (a, caches[0]), (b, caches[1]) = (
            g.step(np.asarray([chunk]), c, seen) for g, c in zip((fused, plain), caches, strict=True)
        )
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        for x, y in zip(*caches, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        seen += len(chunk)
    # A batched prefill with right padding: rows of different lengths.
    gen = fused
    batch = np.asarray([PROMPT, PROMPT[:4] + [0, 0, 0]])
    mask = np.asarray([[1] * 7, [1] * 4 + [0] * 3])
    feeds = {"input_ids": batch, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(1) - 1, 0, None)}
    feeds.update({s.name: s.empty_past(2) for s in gen.past})
    logits = gen.session.run(["logits"], feeds)[0]
    single = Generator(tmp_path / "unfused").session.run(
        ["logits"], {**{k: v[1:, :4] for k, v in feeds.items() if k in ("input_ids", "attention_mask", "position_ids")},
                     **{s.name: s.empty_past(1) for s in gen.past}})[0]
    np.testing.assert_allclose(logits[1, :4], single[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_smollm2_with_past_generates_like_transformers_and_onnxruntime_genai(smollm2_gguf, tmp_path):
    result = export(smollm2_gguf, tmp_path / "fp32")
    assert result.attention == "GroupQueryAttention" and result.max_rel_diff < 1e-3
    gen = Generator(tmp_path / "fp32", threads=2)
    ours = gen.generate("The history of the printing press begins", max_new_tokens=32)
    assert len(ours.token_ids) == 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ours.prompt_ids]), max_new_tokens=32, do_sample=False)
    assert ours.token_ids == ref[0, len(ours.prompt_ids):].tolist()
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'ortq[llm]')")
    theirs = Generator(tmp_path / "fp32", engine="genai").generate(ours.prompt_ids, max_new_tokens=32)
    assert theirs.token_ids == ours.token_ids


@pytest.mark.parametrize("argv", [[], ["--weight-only", "int4"]], ids=["int8", "int4"])
def test_quantized_decoder_with_past_generates(tiny_llama_dir, tmp_path, argv):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama_dir), "-o", str(out), "--num-samples", "16", *argv]) == 0
    fp32, quant = Generator(tiny_llama_dir), Generator(out)
    logits = []
    for gen in (fp32, quant):
        step, _ = gen.step(np.asarray([PROMPT]), [s.empty_past(1) for s in gen.past], 0)
        logits.append(step[0])
    a, b = logits
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
    assert len(quant.generate(PROMPT, max_new_tokens=8).token_ids) >= 1


def test_rotary_and_packed_qkv_go_inside_the_fused_op(tmp_path):
    """head_dim 16 (ONNX Runtime rotates inside GroupQueryAttention from there): one packed QKV MatMul and the
    op's own rotary per layer, no run-time shape arithmetic, and still transformers' tokens and logits."""
    from conftest import _save_source, _tokenizer

    tok = _tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(3)
    src = _save_source(transformers.LlamaForCausalLM(config).eval(), tok, tmp_path / "src")
    result = export(src, tmp_path / "onnx")
    assert result.attention == "GroupQueryAttention" and result.max_rel_diff < 1e-4
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    for op in ("Sin", "Cos", "Neg", "Slice", "Reshape", "Transpose", "Concat"):
        assert op not in ops, op
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and ops.count("MatMul") == 2 * 4 + 1  # qkv, o, gate+up, down per layer; lm_head
    assert ops.count("Split") == 2
    assert ops.count("SkipSimplifiedLayerNormalization") == 4  # every RMS norm after a residual sum
    for node in gqa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["do_rotary"] == 1
        assert node.input[1] == node.input[2] == "" and node.input[9] == "position_ids"
    consts = {i.name: list(i.dims) for i in graph.initializer}
    consts.update({n.output[0]: list(n.attribute[0].t.dims) for n in graph.node if n.op_type == "Constant"})
    assert consts[gqa[0].input[7]] == consts[gqa[0].input[8]] == [256, 8]
    out = Generator(tmp_path / "onnx").generate(PROMPT, max_new_tokens=12)
    assert out.token_ids == _hf_greedy(src, PROMPT, len(out.token_ids))
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return
    assert Generator(tmp_path / "onnx", engine="genai").generate(PROMPT, max_new_tokens=12).token_ids == out.token_ids
