"""Encoder-decoder models (T5, BART / mBART, Whisper) as three graphs, in Optimum's file layout.

========================================  =================================================================
file                                      inputs -> outputs
========================================  =================================================================
``encoder_model.onnx``                    ``input_ids``, ``attention_mask`` (text) or ``input_features``
                                          (speech) -> ``last_hidden_state``
``decoder_model.onnx`` (first step)       ``input_ids``, ``encoder_hidden_states``, ``encoder_attention_mask``
                                          -> ``logits``, ``present.{i}.decoder.key/value``,
                                          ``present.{i}.encoder.key/value``
``decoder_with_past_model.onnx``          ``input_ids``, ``encoder_attention_mask``,
                                          ``past_key_values.{i}.decoder.key/value``,
                                          ``past_key_values.{i}.encoder.key/value``
                                          -> ``logits``, ``present.{i}.decoder.key/value``
========================================  =================================================================

Whisper's decoders take no ``encoder_attention_mask`` (its encoder never pads). Caches are
``[batch, heads, length, head_dim]``; the cross-attention cache is computed once by the first-step decoder and
fed unchanged to every later step.

Two decoder files rather than one merged graph with an ``If`` on "has past": the first step computes the
cross-attention keys and values from ``encoder_hidden_states``, later steps only read them, so the two graphs
differ in their inputs, outputs and weights used. Kept apart, each is a flat graph that the int8 / int4 passes
and ONNX Runtime's fusions see whole (no subgraphs), and each is calibrated on the activations it really sees.
The price is the decoder weights stored twice on disk.

Every file is checked against PyTorch on inputs of shapes other than the traced ones, the decoders with caches
that PyTorch computed.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from ortq.errors import ExportError, require
from ortq.export.convert import convert, drop_weight_identities, save_checked, set_metadata
from ortq.export.decoder import cache_keyword, cache_of
from ortq.export.parity import compare_with_torch
from ortq.export.spec import PARITY_TEXTS, ExportSpec, text_inputs

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
DECODER_WITH_PAST_FILE = "decoder_with_past_model.onnx"
SEQ2SEQ_FILES = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """``{prefix}.{i}.decoder.key/value``, ``{prefix}.{i}.encoder.key/value`` per layer, in that order."""
    return [
        f"{prefix}.{i}.{part}.{kv}" for i in range(num_layers) for part in ("decoder", "encoder") for kv in ("key", "value")
    ]


def is_speech(model: Any) -> bool:
    """Whether the encoder reads ``input_features`` (Whisper) rather than ``input_ids``."""
    return "input_features" in inspect.signature(model.forward).parameters


def encoder_input_name(model: Any) -> str:
    return "input_features" if is_speech(model) else "input_ids"


def _wrappers(model: Any):
    """(encoder, first-step decoder, decoder with past) modules taking positional tensors."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    keyword = cache_keyword(model)
    speech = is_speech(model)
    layers = model.config.decoder_layers if hasattr(model.config, "decoder_layers") else model.config.num_decoder_layers

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            encoder = self.model.get_encoder()
            if speech:
                return encoder(input_features=args[0]).last_hidden_state
            return encoder(input_ids=args[0], attention_mask=args[1]).last_hidden_state

    def flat(cache, with_cross: bool) -> list[Any]:
        out = []
        self_layers = cache.self_attention_cache.layers
        cross_layers = cache.cross_attention_cache.layers
        for i in range(layers):
            out += [self_layers[i].keys, self_layers[i].values]
            if with_cross:
                out += [cross_layers[i].keys, cross_layers[i].values]
        return out

    def run(input_ids, encoder_hidden_states, encoder_mask, cache):
        kwargs = {"decoder_input_ids": input_ids, "encoder_outputs": (encoder_hidden_states,),
                  "use_cache": True, keyword: cache}
        if encoder_mask is not None:
            kwargs["attention_mask"] = encoder_mask
        return self_model(**kwargs)

    self_model = model

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, encoder_hidden_states, *rest):
            mask = None if speech else rest[0]
            empty = transformers.EncoderDecoderCache(
                transformers.DynamicCache(config=self.model.config), transformers.DynamicCache(config=self.model.config)
            )
            out = run(input_ids, encoder_hidden_states, mask, empty)
            return (out.logits, *flat(cache_of(out), with_cross=True))

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *rest):
            mask, past = (None, rest) if speech else (rest[0], rest[1:])
            self_pairs = [(past[4 * i], past[4 * i + 1]) for i in range(layers)]
            cross_pairs = [(past[4 * i + 2], past[4 * i + 3]) for i in range(layers)]
            cache = transformers.EncoderDecoderCache(
                transformers.DynamicCache(self_pairs, config=self.model.config),
                transformers.DynamicCache(cross_pairs, config=self.model.config),
            )
            # The cross-attention cache is filled, so the encoder states are never read: a placeholder of the
            # right shape (taken from the cached keys, so that it stays dynamic) stands in for them.
            key = past[2]
            hidden = key.new_zeros((key.shape[0], key.shape[2], self.model.config.d_model))
            out = run(input_ids, hidden, mask, cache)
            return (out.logits, *flat(cache_of(out), with_cross=False))

    return Encoder().eval(), Decoder().eval(), DecoderWithPast().eval(), layers


def _encoder_inputs(model, tokenizer, max_length: int, texts: list[str], pad_to: int | None = None):
    """Encoder inputs as a tuple, and the numpy padding mask (None for speech)."""
    torch = require("torch", "export")
    if is_speech(model):
        config = model.config
        frames = 2 * int(config.max_source_positions)
        gen = torch.Generator().manual_seed(len(texts))
        return (torch.randn((len(texts), config.num_mel_bins, frames), generator=gen),), None
    (ids, mask), np_mask = text_inputs(tokenizer, model.config, ["input_ids", "attention_mask"], texts, max_length,
                                      pad_to)
    return (ids, mask), np_mask


def decoder_start_ids(model: Any, batch: int, length: int = 1):
    """``[batch, length]`` decoder input ids: the start token, then a few fixed ordinary tokens."""
    torch = require("torch", "export")
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.decoder_start_token_id
    if isinstance(start, list):
        start = start[0]
    vocab = int(model.config.vocab_size)
    ids = torch.full((batch, length), int(start), dtype=torch.long)
    for j in range(1, length):
        ids[:, j] = (7 * j + torch.arange(batch) * 13 + 5) % vocab
    return ids


def seq2seq_specs(model: Any, tokenizer: Any, task: str, max_length: int) -> dict[str, ExportSpec]:
    """What to trace for each of the three files, with parity inputs computed by PyTorch."""
    torch = require("torch", "export")
    model.config.use_cache = True
    encoder, decoder, decoder_past, layers = _wrappers(model)
    speech = is_speech(model)
    enc_name = encoder_input_name(model)
    enc_names = [enc_name] if speech else ["input_ids", "attention_mask"]
    decoder_mask = [] if speech else ["encoder_attention_mask"]
    presents_full = past_names(layers, "present")
    presents_self = [n for n in presents_full if ".decoder." in n]
    pasts = past_names(layers)

    def enc(texts: list[str], pad_to: int | None = None):
        inputs, mask = _encoder_inputs(model, tokenizer, max_length, texts, pad_to)
        return inputs, mask

    def decoder_case(texts: list[str], length: int, pad_to: int | None = None):
        inputs, mask = enc(texts, pad_to)
        with torch.no_grad():
            hidden = encoder(*inputs)
        ids = decoder_start_ids(model, hidden.shape[0], length)
        extra = [] if speech else [inputs[1]]
        return (ids, hidden, *extra)

    def past_case(texts: list[str], prefix: int, new: int):
        first = decoder_case(texts, prefix + new)
        ids = first[0]
        with torch.no_grad():
            cached = decoder(ids[:, :prefix], *first[1:])[1:]
        extra = [] if speech else [first[2]]
        return (ids[:, prefix:], *extra, *cached)

    two, three = [PARITY_TEXTS[0], PARITY_TEXTS[2]], [PARITY_TEXTS[1], PARITY_TEXTS[2], PARITY_TEXTS[3]]
    enc_axes = {n: {0: "batch_size", 1: "encoder_sequence_length"} for n in enc_names}
    if speech:
        enc_axes = {enc_name: {0: "batch_size"}}
    enc_axes["last_hidden_state"] = {0: "batch_size", 1: "encoder_sequence_length"}
    enc_example, _ = enc(two, pad_to=12)
    enc_parity = [enc(three), enc([PARITY_TEXTS[0]])]
    specs = {
        ENCODER_FILE: ExportSpec(
            module=encoder, task=task, input_names=enc_names, output_names=["last_hidden_state"],
            dynamic_axes=enc_axes, example=enc_example, parity=[p[0] for p in enc_parity],
            masks=[p[1] for p in enc_parity],
        )
    }
    dec_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
        "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
        "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "logits": {0: "batch_size", 1: "decoder_sequence_length"},
    }
    for n in presents_full:
        dec_axes[n] = {0: "batch_size", 2: "decoder_sequence_length" if ".decoder." in n else "encoder_sequence_length"}
    if speech:
        del dec_axes["encoder_attention_mask"]
    dec_parity = [decoder_case(three, 1), decoder_case([PARITY_TEXTS[0]], 4)]
    specs[DECODER_FILE] = ExportSpec(
        module=decoder, task=task, input_names=["input_ids", "encoder_hidden_states", *decoder_mask],
        output_names=["logits", *presents_full], dynamic_axes=dec_axes, example=decoder_case(two, 3, pad_to=12),
        parity=dec_parity, masks=[None] * len(dec_parity),
    )
    past_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
        "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "logits": {0: "batch_size", 1: "decoder_sequence_length"},
    }
    if speech:
        del past_axes["encoder_attention_mask"]
    for n in pasts:
        past_axes[n] = {0: "batch_size", 2: "past_decoder_sequence_length" if ".decoder." in n
                        else "encoder_sequence_length"}
    for n in presents_self:
        past_axes[n] = {0: "batch_size", 2: "total_decoder_sequence_length"}
    past_parity = [past_case(three, 1, 1), past_case([PARITY_TEXTS[0]], 3, 1)]
    specs[DECODER_WITH_PAST_FILE] = ExportSpec(
        module=decoder_past, task=task, input_names=["input_ids", *decoder_mask, *pasts],
        output_names=["logits", *presents_self], dynamic_axes=past_axes, example=past_case(two, 2, 2),
        parity=past_parity, masks=[None] * len(past_parity),
    )
    logger.info("seq2seq: %d decoder layers, encoder input %s", layers, enc_name)
    return specs


def write_graphs(specs: dict[str, ExportSpec], folder: Any, opset: int, exporter: str, *, check_parity: bool,
                 max_length: int | None) -> dict[str, dict[str, Any]]:
    """Convert each spec to ``folder/<file>``, check it with onnx.checker and against PyTorch.

    Returns per file: ``exporter``, ``inputs``, ``outputs``, ``max_abs_diff``, ``max_rel_diff``,
    ``parity_shapes``, ``export_seconds``.
    """
    folder = Path(folder)
    done: dict[str, dict[str, Any]] = {}
    for file_name, spec in specs.items():
        # The exporters may write external data beside the file: convert each in a folder of its own.
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            scratch_path = Path(scratch) / file_name
            t0 = time.perf_counter()
            try:
                used = convert(spec, scratch_path, opset, exporter)
            except ExportError as exc:
                raise ExportError(f"{file_name}: {exc}") from exc
            seconds = time.perf_counter() - t0
            proto = onnx.load(str(scratch_path), load_external_data=True)
        inits = {t.name for t in proto.graph.initializer}
        inputs = tuple(i.name for i in proto.graph.input if i.name not in inits)
        drop_weight_identities(proto)
        set_metadata(proto, spec.task, max_length, used, {})
        path = folder / file_name
        external = save_checked(proto, path)
        del proto
        max_abs = max_rel = None
        shapes: tuple = ()
        if check_parity:
            try:
                max_abs, max_rel, shapes = compare_with_torch(spec, path)
            except ExportError as exc:
                raise ExportError(f"{file_name}: {exc}") from exc
        done[file_name] = {
            "exporter": used,
            "inputs": inputs,
            "outputs": tuple(spec.output_names),
            "max_abs_diff": max_abs,
            "max_rel_diff": max_rel,
            "parity_shapes": shapes,
            "export_seconds": seconds,
            "external_data": external,
        }
        logger.info("%s: %s exporter, parity max abs diff %s", file_name, used, max_abs)
    return done
