"""``genai_config.json``: what onnxruntime-genai needs beside a decoder with a KV cache to load and generate.

The fields follow onnxruntime-genai's model builder: the graph's input and output names (past and present as
``%d`` patterns), the cache layout, the special tokens and the search defaults from ``generation_config``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ortq.io import MODEL_FILENAME, write_text_atomic
from ortq.tasks import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


def _token(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return int(value) if value is not None else None


def genai_config(
    config: Any,
    generation: Any,
    *,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    context_length: int,
    filename: str = MODEL_FILENAME,
) -> dict[str, Any]:
    """The ``genai_config.json`` document of a decoder exported by :mod:`ortq.export.decoder`."""

    def setting(name: str, default: Any) -> Any:
        for source in (generation, config):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return default

    model_type = str(getattr(config, "model_type", "decoder")).replace("-", "_")
    eos = setting("eos_token_id", None)
    return {
        "model": {
            "bos_token_id": _token(setting("bos_token_id", None)),
            "context_length": int(context_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(head_dim),
                "hidden_size": int(getattr(config, "hidden_size", head_dim * kv_heads)),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": PAST_KEY.replace("{layer}", "%d"),
                    "past_value_names": PAST_VALUE.replace("{layer}", "%d"),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY.replace("{layer}", "%d"),
                    "present_value_names": PRESENT_VALUE.replace("{layer}", "%d"),
                },
                "num_attention_heads": int(getattr(config, "num_attention_heads", kv_heads)),
                "num_hidden_layers": int(num_layers),
                "num_key_value_heads": int(kv_heads),
            },
            "eos_token_id": _token(eos),
            "pad_token_id": _token(setting("pad_token_id", eos[0] if isinstance(eos, list) else eos)),
            "type": model_type,
            "vocab_size": int(getattr(config, "vocab_size", 0)),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(setting("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(context_length),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # The graph concatenates past and new keys (no in-place buffer): present is a new tensor.
            "past_present_share_buffer": False,
            "repetition_penalty": float(setting("repetition_penalty", 1.0)),
            "temperature": float(setting("temperature", 1.0)),
            "top_k": int(setting("top_k", 50)),
            "top_p": float(setting("top_p", 1.0)),
        },
    }


def write_genai_config(folder: Path, document: dict[str, Any]) -> Path:
    path = Path(folder) / GENAI_CONFIG
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    return path
