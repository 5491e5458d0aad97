"""Causal LMs with a KV cache: the graph generation runs on.

Inputs ``input_ids``, ``attention_mask`` (over past and new tokens), ``position_ids`` and
``past_key_values.{i}.key/value`` ``[batch, kv_heads, past_sequence_length, head_dim]``; outputs ``logits`` and
``present.{i}.key/value`` ``[batch, kv_heads, total_sequence_length, head_dim]``. Batch, sequence and past length
are dynamic; a prefill feeds past tensors of length 0. This is the layout of Optimum's ``text-generation-with-past``
and of onnxruntime-genai's decoders.

The parity inputs cover a batched prefill (past length 0), a one-token decode step and a multi-token chunk, both
with a real cache computed by PyTorch.
"""

from __future__ import annotations

import logging
from typing import Any

from ortq.errors import ExportError, require
from ortq.export import attention
from ortq.export.spec import PARITY_TEXTS, ExportSpec, text_inputs
from ortq.tasks import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

logger = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "position_ids")


def cache_layout(model: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's KV cache, read from one real forward pass (every architecture
    agrees on what its cache holds, not on how its config names it)."""
    torch = require("torch", "export")
    with torch.no_grad():
        out = model(input_ids=torch.ones((1, 1), dtype=torch.long), use_cache=True)
    layers = getattr(cache_of(out), "layers", None)
    if not layers:
        raise ExportError(f"{type(model).__name__} returns no KV cache; export it with --task causal-lm-no-past")
    keys = [layer.keys for layer in layers]
    if any(k is None or k.dim() != 4 for k in keys):
        raise ExportError(
            f"{type(model).__name__}: its cache is not [batch, heads, sequence, head_dim] per layer; "
            "export it with --task causal-lm-no-past"
        )
    return len(keys), int(keys[0].shape[1]), int(keys[0].shape[3])


def cache_keyword(model: Any) -> str:
    """transformers >= 5.24 names the cache argument ``cache``; earlier releases ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(output: Any) -> Any:
    """The cache a transformers forward returned (``cache`` from 5.24 on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def past_names(num_layers: int) -> list[str]:
    return [n.format(layer=i) for i in range(num_layers) for n in (PAST_KEY, PAST_VALUE)]


def present_names(num_layers: int) -> list[str]:
    return [n.format(layer=i) for i in range(num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]


def _wrapper(model: Any, num_layers: int, fused: bool, rotary: attention.RotaryPlan | None = None):
    """A module taking ``(input_ids, attention_mask, position_ids, *past)`` positionally and returning
    ``(logits, *present)``: the cache travels as plain tensors in and out. ``fused``: every self-attention
    becomes one ``GroupQueryAttention`` (see :mod:`ortq.export.attention`), rotating query and key itself where
    ``rotary`` is given."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")

    keyword = cache_keyword(model)
    if fused:
        attention.register()

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(num_layers)]
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            if not fused:
                cache = transformers.DynamicCache(pairs, config=self.model.config)
                out = self.model(**inputs, use_cache=True, **{keyword: cache})
                present = [t for layer in cache_of(out).layers for t in (layer.keys, layer.values)]
                return (out.logits, *present)
            with (
                attention.fused_step(pairs, attention_mask, position_ids, rotary) as step,
                attention.attention_implementation(self.model, attention.IMPLEMENTATION),
                attention.rotary_inside(rotary),
            ):
                cache = attention.new_only_cache(pairs, self.model.config)
                out = self.model(**inputs, use_cache=True, **{keyword: cache})
            if sorted(step["present"]) != list(range(num_layers)):
                raise attention.FusedAttentionUnsupported(
                    f"{type(self.model).__name__}: not every layer's attention went through the fused op"
                )
            present = [t for i in range(num_layers) for t in step["present"][i]]
            return (out.logits, *present)

    return DecoderWithPast().eval()


def decoder_spec(model: Any, tokenizer: Any, max_length: int, *, fused_attention: bool = True) -> ExportSpec:
    """What to trace for ``causal-lm``: the decoder with its cache as graph inputs and outputs, attention fused
    into ``GroupQueryAttention`` when ``fused_attention``."""
    torch = require("torch", "export")
    model.config.use_cache = True
    layers, heads, head_dim = cache_layout(model)
    rotary = None
    if fused_attention:
        positions = int(getattr(model.config, "max_position_embeddings", 0) or max_length)
        rotary, why = attention.rotary_plan(model, positions, head_dim)
        if rotary is None:
            logger.info("rotary embedding kept in standard ops: %s", why)
    module = _wrapper(model, layers, fused_attention, rotary)
    past, present = past_names(layers), present_names(layers)

    def empty(batch: int) -> list[Any]:
        return [torch.zeros((batch, heads, 0, head_dim)) for _ in past]

    def prefill(texts: list[str], pad_to: int | None = None):
        (ids, mask, pos), np_mask = text_inputs(tokenizer, model.config, list(INPUTS), texts, max_length, pad_to)
        return (ids, mask, pos, *empty(ids.shape[0])), np_mask

    def step(text: str, new_tokens: int):
        """The cache of ``text`` from PyTorch, then ``new_tokens`` more tokens."""
        (ids, _, _), _ = text_inputs(tokenizer, model.config, list(INPUTS), [text], max_length)
        ids = ids[:, : max(2, ids.shape[1])]
        if ids.shape[1] <= new_tokens:
            ids = torch.cat([ids, ids[:, :1].repeat(1, new_tokens - ids.shape[1] + 1)], dim=1)
        head, tail = ids[:, :-new_tokens], ids[:, -new_tokens:]
        n = head.shape[1]
        with torch.no_grad():
            cached = module(head, torch.ones_like(head), torch.arange(n)[None], *empty(1))[1:]
        mask = torch.ones((1, n + new_tokens), dtype=torch.long)
        pos = torch.arange(n, n + new_tokens)[None]
        return (tail, mask, pos, *cached), None

    # Traced with a non-empty past so that no shape is specialised to 0 (batch 1: GroupQueryAttention on CPU
    # takes a multi-token chunk over a cache only at batch 1).
    example = step(PARITY_TEXTS[1], 3)[0]
    parity = [prefill([PARITY_TEXTS[1], PARITY_TEXTS[2], PARITY_TEXTS[3]]), step(PARITY_TEXTS[0], 1),
              step(PARITY_TEXTS[3], 4)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present})
    logger.info("KV cache: %d layers x %d heads x %d", layers, heads, head_dim)
    return ExportSpec(
        module=module,
        task="causal-lm",
        input_names=[*INPUTS, *past],
        output_names=["logits", *present],
        dynamic_axes=axes,
        example=example,
        parity=[p[0] for p in parity],
        masks=[p[1] for p in parity],
        kv_cache=(layers, heads, head_dim),
        custom_opsets={"com.microsoft": 1} if fused_attention else None,
        context_length=int(getattr(model.config, "max_position_embeddings", 0) or 0) or None,
    )
