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
Rotary position embeddings go inside the op too (``do_rotary`` with cos/sin caches, as the builder emits them)
where the model's rotation is the standard one over the whole head and its frequencies do not depend on the
sequence length (see :func:`rotary_plan`); otherwise they stay in standard ops before it. Q/K norms and biases
stay as the model computes them. The query/key/value reshapes of the model's ``view(...).transpose(1, 2)`` are
traced away: the op reads the projections' ``[batch, sequence, heads * head_dim]`` outputs directly.

Limits, refused with a reason (the export then falls back to standard ops): attention soft-capping, attention
sinks, and cross-attention. ``GroupQueryAttention`` on CPU runs a chunk of several new tokens on top of a
non-empty cache only at batch size 1; prefill (empty cache) and one-token decode steps take any batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
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
                    num_heads, kv_heads, window, cos, sin, position_ids, cos_cache, sin_cache):
            if cos is not None:  # the rotation the model would have applied (rotate_half convention)
                query, key = rotate(query, key, cos, sin)
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
                     num_heads, kv_heads, window, cos, sin, position_ids, cos_cache, sin_cache):
            def flat(x):  # [batch, heads, seq, dim] -> [batch, seq, heads * dim]
                source = _projection_of(x)
                if source is not None:
                    return source
                x = g.op("Transpose", x, perm_i=[0, 2, 1, 3])
                return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64)))

            attrs = {"num_heads_i": num_heads, "kv_num_heads_i": kv_heads, "scale_f": scaling}
            if window:
                attrs["local_window_size_i"] = window
            inputs = [flat(query), flat(key), flat(value), past_key, past_value, seqlens_k, total_length]
            if cos_cache is not None:
                attrs["do_rotary_i"] = 1
                inputs += [cos_cache, sin_cache, position_ids]
            out, present_key, present_value = g.op(
                f"com.microsoft::{OP_TYPE}", *inputs, outputs=3, **attrs,
            )
            # Types of the contrib op's outputs (rank and dtype; sizes symbolic), which the exporter cannot infer.
            out.setType(query.type().with_sizes([None, None, None]))
            for present in (present_key, present_value):
                present.setType(past_key.type().with_sizes([None, None, None, None]))
            heads = g.op("Constant", value_t=torch.tensor([0, 0, num_heads, -1], dtype=torch.int64))
            return g.op("Reshape", out, heads), present_key, present_value

    return GroupQueryAttention


def rotate(query, key, cos, sin):
    """The standard rotary embedding (``rotate_half`` convention) of ``[batch, heads, seq, dim]`` query and key by
    ``[batch, seq, dim]`` cos/sin: what ``GroupQueryAttention`` computes with ``do_rotary``."""
    torch = require("torch", "export")

    def half(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat((-b, a), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + half(query) * sin, key * cos + half(key) * sin


def _projection_of(x):
    """The ``[batch, seq, heads * dim]`` tensor that ``x`` (``[batch, heads, seq, dim]``) is a
    ``view(...).transpose(1, 2)`` of in the graph being exported, or None."""
    node = x.node()
    if node.kind() != "onnx::Transpose" or list(getattr(node, "is")("perm")) != [0, 2, 1, 3]:
        return None
    reshape = node.input().node()
    if reshape.kind() != "onnx::Reshape":
        return None
    source = reshape.inputsAt(0)
    src, dst = _sizes(source), _sizes(x)
    if src is None or dst is None or len(src) != 3 or len(dst) != 4:
        return None

    def differ(a, b):  # known sizes that disagree (dynamic ones are None)
        return a is not None and b is not None and a != b

    heads_dim = dst[1] * dst[3] if dst[1] is not None and dst[3] is not None else None
    if differ(src[0], dst[0]) or differ(src[1], dst[2]) or differ(src[2], heads_dim):
        return None
    return source


def _sizes(value) -> list | None:
    try:
        return value.type().varyingSizes()
    except RuntimeError:  # not a tensor type with a known rank
        return None


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
    plan, cos_sin = step.get("rotary"), step.pop("cos_sin", None)
    if (plan is None) != (cos_sin is None):
        raise FusedAttentionUnsupported(f"{type(module).__name__}: its rotary embedding did not go through ortq")
    cos, sin = cos_sin or (None, None)
    out, present_key, present_value = step["function"].apply(
        query, key, value, past_key, past_value, attention_mask, step["seqlens_k"], step["total_length"],
        scale, num_heads, kv_heads, int(window), cos, sin, step["position_ids"],
        plan.cos_cache if plan else None, plan.sin_cache if plan else None,
    )
    step["present"][layer] = (present_key, present_value)
    return out, None


@dataclasses.dataclass
class RotaryPlan:
    """Rotary embeddings computed inside ``GroupQueryAttention``: the cos/sin caches ``[positions, head_dim / 2]``
    and the modeling modules whose ``apply_rotary_pos_emb`` the export replaces."""

    cos_cache: Any
    sin_cache: Any
    modules: tuple[Any, ...]


_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def rotary_plan(model: Any, positions: int, head_dim: int) -> tuple[RotaryPlan | None, str]:
    """How the decoder's rotary embedding can move into the fused op, or (None, why not).

    Requirements: one rotary module of a rope type whose frequencies do not depend on the sequence length, a
    rotation over the whole head, and an ``apply_rotary_pos_emb`` that computes exactly the standard
    ``rotate_half`` rotation (checked numerically on random tensors)."""
    import sys

    torch = require("torch", "export")
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1:
        return None, f"{len(rotaries)} rotary embedding modules"
    rotary = rotaries[0]
    rope = getattr(rotary, "rope_type", "default")
    if rope not in _STATIC_ROPE:
        return None, f"rope type {rope!r} depends on the sequence length"
    modules = []
    for m in model.modules():
        module = sys.modules.get(type(m).__module__)
        if getattr(m, "layer_idx", None) is not None and hasattr(module, "apply_rotary_pos_emb"):
            if module not in modules:
                modules.append(module)
    if not modules:
        return None, "no apply_rotary_pos_emb in the attention's module"
    with torch.no_grad():
        probe = torch.zeros((1, 1, 1))
        cos, sin = rotary(probe, torch.arange(positions)[None])
        cos, sin = cos[0].float(), sin[0].float()
        dim = cos.shape[-1]
        if dim != head_dim:
            return None, f"rotation over {dim} of {head_dim} head dimensions"
        if head_dim % 16:  # ONNX Runtime's rotary kernels inside GroupQueryAttention
            return None, f"head_dim {head_dim} is not a multiple of 16"
        if dim % 2 or not torch.equal(cos[:, : dim // 2], cos[:, dim // 2:]):
            return None, "not a rotate_half rotation"
        gen = torch.Generator().manual_seed(0)
        heads = max(1, int(getattr(model.config, "num_attention_heads", 1)))
        q, k = (torch.randn((1, heads, 5, dim), generator=gen) for _ in range(2))
        c, s = cos[None, 3:8], sin[None, 3:8]
        want = rotate(q, k, c, s)
        for module in modules:
            try:
                got = module.apply_rotary_pos_emb(q, k, c, s)
            except Exception as exc:  # noqa: BLE001 - an unexpected signature: leave the rotation to the model
                return None, f"apply_rotary_pos_emb of {module.__name__} ({exc})"
            if not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, got, strict=True)):
                return None, f"apply_rotary_pos_emb of {module.__name__} is not the whole-head rotate_half rotation"
    half = dim // 2
    return RotaryPlan(cos[:, :half].contiguous(), sin[:, :half].contiguous(), tuple(modules)), ""


@contextlib.contextmanager
def rotary_inside(plan: RotaryPlan | None) -> Iterator[None]:
    """Within fused decoder steps, each ``apply_rotary_pos_emb`` of ``plan`` hands its cos/sin to the fused op
    and returns query and key unrotated (the op rotates them)."""
    if plan is None:
        yield
        return
    saved = [(m, m.apply_rotary_pos_emb) for m in plan.modules]

    def hand_over(original):
        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            step = _STEP.get()
            if step is None or step.get("rotary") is None or args or kwargs:
                return original(q, k, cos, sin, *args, **kwargs)
            step["cos_sin"] = (cos, sin)
            return q, k

        return apply_rotary_pos_emb

    try:
        for m, original in saved:
            m.apply_rotary_pos_emb = hand_over(original)
        yield
    finally:
        for m, original in saved:
            m.apply_rotary_pos_emb = original


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
def fused_step(pairs: list[tuple[Any, Any]], attention_mask: Any, position_ids: Any,
               rotary: RotaryPlan | None = None) -> Iterator[dict[str, Any]]:
    """The state one decoder step's attention layers share; ``present`` fills with each layer's new cache."""
    torch = require("torch", "export")
    step = {
        "function": _function(),
        "past": dict(enumerate(pairs)),
        "present": {},
        "seqlens_k": (attention_mask.sum(-1) - 1).to(torch.int32),
        "total_length": torch._shape_as_tensor(attention_mask)[1].to(torch.int32),
        "position_ids": position_ids,
        "rotary": rotary,
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
