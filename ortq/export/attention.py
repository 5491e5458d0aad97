"""Fused attention for decoders: each self-attention exported as one ``com.microsoft.GroupQueryAttention``.

ONNX Runtime's ``GroupQueryAttention`` (CPU and CUDA) takes the new query/key/value of a step in ``[batch,
sequence, heads * head_dim]``, the past cache ``[batch, kv_heads, past, head_dim]``, ``seqlens_k`` (per row,
the index of its last valid token) and the total sequence length; it concatenates the cache, shares key/value
heads across query groups, applies the causal mask and returns the output with the new cache. One node
replaces the cache Concat, the key/value repeat, two MatMuls, the scale, the mask and the Softmax of every
layer, as onnxruntime-genai's model builder emits it.

How: transformers routes every attention through a registry of attention functions. ortq registers one
(``ortq_gqa``) whose computation is an ``autograd.Function``: in PyTorch it computes eager attention exactly
(so the parity check compares real numbers), and its ONNX symbolic emits ``GroupQueryAttention``. The cache
handed to the model returns the new key/value unconcatenated, so the graph concatenates once, inside the op.
Rotary embeddings, q/k norms and biases stay as the model computes them, in standard ops before the op.

Limits, refused with a reason (the export then falls back to standard ops): attention soft-capping, attention
sinks, and cross-attention. ``GroupQueryAttention`` on CPU runs a chunk of several new tokens on top of a
non-empty cache only at batch size 1; prefill (empty cache) and one-token decode steps take any batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

from ortq.errors import ExportError, require

logger = logging.getLogger(__name__)

IMPLEMENTATION = "ortq_gqa"
OP_TYPE = "GroupQueryAttention"

_STEP: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("ortq_gqa_step", default=None)
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


class FusedAttentionUnsupported(ExportError):
    """The model's attention uses something ``GroupQueryAttention`` does not compute."""


def _function():
    torch = require("torch", "export")

    class GroupQueryAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, past_key, past_value, mask, seqlens_k, total_length, scaling,
                    num_heads, kv_heads, window):
            key_all = torch.cat([past_key, key], dim=2)
            value_all = torch.cat([past_value, value], dim=2)
            groups = num_heads // kv_heads
            k = key_all.repeat_interleave(groups, dim=1)
            v = value_all.repeat_interleave(groups, dim=1)
            weights = torch.matmul(query, k.transpose(2, 3)) * scaling
            if mask is not None:
                weights = weights + mask[:, :, :, : k.shape[-2]]
            weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            out = torch.matmul(weights, v).transpose(1, 2).contiguous()
            return out, key_all, value_all

        @staticmethod
        def symbolic(g, query, key, value, past_key, past_value, mask, seqlens_k, total_length, scaling,
                     num_heads, kv_heads, window):
            def flat(x):  # [batch, heads, seq, dim] -> [batch, seq, heads * dim]
                x = g.op("Transpose", x, perm_i=[0, 2, 1, 3])
                return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64)))

            attrs = {"num_heads_i": num_heads, "kv_num_heads_i": kv_heads, "scale_f": scaling}
            if window:
                attrs["local_window_size_i"] = window
            out, present_key, present_value = g.op(
                f"com.microsoft::{OP_TYPE}", flat(query), flat(key), flat(value), past_key, past_value,
                seqlens_k, total_length, outputs=3, **attrs,
            )
            # Types of the contrib op's outputs (rank and dtype; sizes symbolic), which the exporter cannot infer.
            out.setType(query.type().with_sizes([None, None, None]))
            for present in (present_key, present_value):
                present.setType(past_key.type().with_sizes([None, None, None, None]))
            heads = g.op("Constant", value_t=torch.tensor([0, 0, num_heads, -1], dtype=torch.int64))
            return g.op("Reshape", out, heads), present_key, present_value

    return GroupQueryAttention


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``ortq_gqa`` attention function transformers calls for every self-attention layer."""
    step = _STEP.get()
    if step is None:
        raise FusedAttentionUnsupported("fused attention called outside an ortq decoder step")
    bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if bad or getattr(module, "is_cross_attention", False):
        raise FusedAttentionUnsupported(
            f"{type(module).__name__} uses {', '.join(bad) or 'cross-attention'}, which GroupQueryAttention lacks"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None or layer not in step["past"]:
        raise FusedAttentionUnsupported(f"{type(module).__name__} has no layer index for its cache")
    past_key, past_value = step["past"][layer]
    num_heads, kv_heads = int(query.shape[1]), int(past_key.shape[1])
    window = kwargs.get("sliding_window") or 0
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    out, present_key, present_value = step["function"].apply(
        query, key, value, past_key, past_value, attention_mask, step["seqlens_k"], step["total_length"],
        scale, num_heads, kv_heads, int(window),
    )
    step["present"][layer] = (present_key, present_value)
    return out, None


def register() -> None:
    """Make ``ortq_gqa`` an attention implementation transformers knows (with the eager mask)."""
    transformers = require("transformers", "export")
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    transformers.AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def new_only_cache(pairs: list[tuple[Any, Any]], config: Any):
    """A cache holding the past that returns each layer's new key/value as they are (not concatenated): the
    fused op concatenates. Its sequence length is the past's, so masks and positions come out right."""
    transformers = require("transformers", "export")

    class NewOnlyCache(transformers.DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return key_states, value_states

    return NewOnlyCache(pairs, config=config)


@contextlib.contextmanager
def fused_step(pairs: list[tuple[Any, Any]], attention_mask: Any) -> Iterator[dict[str, Any]]:
    """The state one decoder step's attention layers share; ``present`` fills with each layer's new cache."""
    torch = require("torch", "export")
    step = {
        "function": _function(),
        "past": dict(enumerate(pairs)),
        "present": {},
        "seqlens_k": (attention_mask.sum(-1) - 1).to(torch.int32),
        "total_length": torch._shape_as_tensor(attention_mask)[1].to(torch.int32),
    }
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


@contextlib.contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Switch the model (and its sub-configs) to attention implementation ``name`` for the block."""
    configs = [model.config] + [getattr(model.config, k) for k in ("text_config",) if hasattr(model.config, k)]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, s in zip(configs, saved, strict=True):
            c._attn_implementation = s
