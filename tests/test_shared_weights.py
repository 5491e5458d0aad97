"""Shared weights: one quantized tensor serves every consumer, in every pass (int8 QDQ, 8-bit embeddings,
MatMulNBits, W4A8). Tiny BART (encoder and decoder share the embedding table) and ALBERT (every layer shares
one set of weights) from configs: export -> int8 / int4 -> ONNX Runtime, no internal error."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from ortq.config import CalibrationConfig, QuantizationConfig, WeightOnlyConfig
from ortq.quantizer import ORTQuantizer
from ortq.runtime import create_session

VOCAB = 8192  # 8192 x 32: a table large enough for 8-bit and 4-bit embedding kernels


def _wrap(model):
    torch = pytest.importorskip("torch")

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Hidden(model).eval()


def _tiny(kind: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bart":
        config = transformers.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        )
        return transformers.BartModel(config)
    config = transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    return transformers.AlbertModel(config)


@pytest.fixture(scope="module", params=["bart", "albert"])
def shared_model(request, tmp_path_factory):
    torch = pytest.importorskip("torch")
    from ortq.export import export

    d = tmp_path_factory.mktemp(request.param)
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    export(_wrap(_tiny(request.param)), d / "fp32", example_inputs={"input_ids": ids, "attention_mask": mask},
           input_names=["input_ids", "attention_mask"], output_names=["hidden"],
           dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                         "hidden": {0: "batch", 1: "seq"}})
    rng = np.random.default_rng(0)
    calib = d / "calib.npz"
    np.savez(calib, input_ids=rng.integers(3, VOCAB, (8, 12)).astype(np.int64),
             attention_mask=np.ones((8, 12), np.int64))
    return request.param, d, calib


def _shared_initializers(model: onnx.ModelProto) -> set[str]:
    uses = Counter(i for n in model.graph.node for i in n.input)
    return {t.name for t in model.graph.initializer if uses[t.name] > 1}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    "config",
    [
        QuantizationConfig(quantize_embeddings=True),
        QuantizationConfig(weight_storage_bits=4),
        WeightOnlyConfig(bits=4, block_size=32),
    ],
    ids=["int8", "w4a8", "int4"],
)
def test_shared_weights_quantize_once(shared_model, config, tmp_path):
    kind, d, calib = shared_model
    fp32 = onnx.load(str(d / "fp32" / "model.onnx"))
    assert _shared_initializers(fp32), f"the tiny {kind} export shares no weight: the test tests nothing"
    q = ORTQuantizer.from_pretrained(d / "fp32")
    q.show_progress = False
    path = q.quantize(config, tmp_path / "q", calibration_data=str(calib),
                      calibration_config=CalibrationConfig(batch_size=4))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    # with embeddings quantized, no float copy of a shared table survives next to its quantized version
    float_big = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                 and int(np.prod(t.dims)) >= VOCAB * 32]
    assert float_big == [] or not config.quantize_embeddings, float_big
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(3, VOCAB, (2, 10)).astype(np.int64), "attention_mask": np.ones((2, 10), np.int64)}
    ref = create_session(d / "fp32" / "model.onnx").run(None, feeds)[0]
    out = create_session(path).run(None, feeds)[0]
    assert out.shape == ref.shape and _cosine(out, ref) > 0.9
