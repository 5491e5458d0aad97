"""One task vocabulary for export, recipes and validation.

A task says which transformers head a model is exported with, what its graph takes and gives, and how a
quantized model is judged against its reference:

========================  ===========================================  ==================================
task                      exported as                                  judged by
========================  ===========================================  ==================================
``feature-extraction``    ``AutoModel`` -> ``last_hidden_state``       sentence-embedding cosine, top-k
                                                                       neighbour agreement
``text-classification``   ``AutoModelForSequenceClassification``       argmax agreement
                          -> ``logits``
``causal-lm``             ``AutoModelForCausalLM`` -> ``logits`` and   perplexity, next-token agreement
                          ``present.{i}.key/value`` (KV cache)
``causal-lm-no-past``     ``AutoModelForCausalLM`` -> ``logits`` only  perplexity, next-token agreement
``text2text-generation``  ``AutoModelForSeq2SeqLM`` -> encoder,        greedy token agreement, first
                          decoder and decoder-with-past files          divergence
``automatic-speech-       ``AutoModelForSpeechSeq2Seq`` -> the same    token error rate
recognition``             three files (``input_features``)
``image-feature-          ``AutoModel`` on ``pixel_values`` ->         cosine of the pooled features
extraction``              ``last_hidden_state``
``image-classification``  ``AutoModelForImageClassification``          argmax agreement
                          -> ``logits``
========================  ===========================================  ==================================

Optimum's names are accepted as aliases (``text-generation-with-past`` is ``causal-lm``, ``text-generation``
the logits-only ``causal-lm-no-past``, ``text2text-generation-with-past`` / ``seq2seq-lm`` is
``text2text-generation``), and so are ``embeddings`` and ``classification``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from ortq.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task means to each stage of the pipeline."""

    name: str
    auto_class: str  # the transformers class that loads the model with its head
    output: str  # the graph output the task is judged on
    inputs: tuple[str, ...]  # graph inputs in Optimum's order; each kept only when forward() takes it
    architecture_suffixes: tuple[str, ...]  # ``config.architectures`` entries ending so belong to this task
    with_past: bool = False  # the graph takes ``past_key_values.{i}.key/value`` and returns ``present.*``
    seq2seq: bool = False  # exported as encoder / decoder / decoder-with-past files
    vision: bool = False  # the graph takes ``pixel_values``

    @property
    def generative(self) -> bool:
        """A causal LM, with or without the KV cache."""
        return self.auto_class == "AutoModelForCausalLM"


TASK_SPECS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "feature-extraction",
            "AutoModel",
            "last_hidden_state",
            ("input_ids", "attention_mask", "token_type_ids"),
            (),
        ),
        Task(
            "text-classification",
            "AutoModelForSequenceClassification",
            "logits",
            ("input_ids", "attention_mask", "token_type_ids"),
            ("ForSequenceClassification",),
        ),
        Task(
            "causal-lm",
            "AutoModelForCausalLM",
            "logits",
            ("input_ids", "attention_mask", "position_ids"),
            ("ForCausalLM", "LMHeadModel"),
            with_past=True,
        ),
        Task(
            "causal-lm-no-past",
            "AutoModelForCausalLM",
            "logits",
            ("input_ids", "attention_mask", "position_ids"),
            (),
        ),
        Task(
            "text2text-generation",
            "AutoModelForSeq2SeqLM",
            "logits",
            ("input_ids", "attention_mask"),
            ("ForConditionalGeneration",),
            seq2seq=True,
        ),
        Task(
            "automatic-speech-recognition",
            "AutoModelForSpeechSeq2Seq",
            "logits",
            ("input_features",),
            (),
            seq2seq=True,
        ),
        Task("image-feature-extraction", "AutoModel", "last_hidden_state", ("pixel_values",), (), vision=True),
        Task(
            "image-classification",
            "AutoModelForImageClassification",
            "logits",
            ("pixel_values",),
            ("ForImageClassification",),
            vision=True,
        ),
    )
}
TASKS = tuple(TASK_SPECS)
ALIASES = {
    "embeddings": "feature-extraction",
    "classification": "text-classification",
    "sequence-classification": "text-classification",
    "text-generation-with-past": "causal-lm",
    "text-generation": "causal-lm-no-past",
    "text2text-generation-with-past": "text2text-generation",
    "seq2seq-lm": "text2text-generation",
    "seq2seq-lm-with-past": "text2text-generation",
    "automatic-speech-recognition-with-past": "automatic-speech-recognition",
    "speech2seq-lm": "automatic-speech-recognition",
    "speech2seq-lm-with-past": "automatic-speech-recognition",
    "asr": "automatic-speech-recognition",
}
# Speech encoder-decoders: ``...ForConditionalGeneration`` of these model types is automatic-speech-recognition.
SPEECH_MODEL_TYPES = ("whisper", "speech_to_text", "speech-encoder-decoder")
# Vision configs: a bare ``AutoModel`` of these is image-feature-extraction (it takes ``pixel_values``).
VISION_MODEL_TYPES = (
    "vit", "deit", "convnext", "convnextv2", "clip_vision_model", "siglip_vision_model", "dinov2", "beit",
    "swin", "resnet", "detr", "yolos", "mobilevit", "efficientnet", "regnet", "levit", "dpt",
)
# Graph inputs / outputs of a KV cache, Optimum's and onnxruntime-genai's names.
PAST_KEY = "past_key_values.{layer}.key"
PAST_VALUE = "past_key_values.{layer}.value"
PRESENT_KEY = "present.{layer}.key"
PRESENT_VALUE = "present.{layer}.value"


def is_past_input(name: str) -> bool:
    """Whether a graph input carries the KV cache of earlier tokens."""
    return name.startswith(("past_key_values.", "past_key_values_", "past.")) or name.startswith("cache.")


def normalize_task(name: str, *, where: str = "") -> str:
    """The canonical name of ``name`` (an alias is accepted); an unknown task is a :class:`ConfigError`."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASK_SPECS:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return key


def task_from_config(config: Any) -> str:
    """The task of a transformers config, from ``config.architectures``.

    ``...ForSequenceClassification`` -> text-classification, ``...ForCausalLM`` / ``...LMHeadModel`` ->
    causal-lm, ``...ForConditionalGeneration`` -> text2text-generation (automatic-speech-recognition for
    Whisper), ``...ForImageClassification`` -> image-classification, a bare vision model ->
    image-feature-extraction, anything else -> feature-extraction.
    """
    model_type = getattr(config, "model_type", None)
    for arch in getattr(config, "architectures", None) or ():
        for task in TASK_SPECS.values():
            if arch.endswith(task.architecture_suffixes):
                if task.name == "text2text-generation" and model_type in SPEECH_MODEL_TYPES:
                    return "automatic-speech-recognition"
                return task.name
    if model_type in VISION_MODEL_TYPES:
        return "image-feature-extraction"
    return "feature-extraction"


def task_from_outputs(
    output_names: Sequence[str], output_shapes: Sequence[tuple[int, ...]], feed_names: Iterable[str]
) -> tuple[str | None, str | None]:
    """Guess the task of an ONNX graph from its primary (first float) output: ``(task, output name)``, or
    ``(None, None)`` when the output says nothing."""
    feeds = set(feed_names)
    for name, shape in zip(output_names, output_shapes, strict=True):
        lname = name.lower()
        rank = len(shape)
        if "logits" in lname:
            if rank == 2:
                return "text-classification", name
            if rank == 3 and "input_ids" in feeds:
                return "causal-lm", name
        if rank == 3 and ("hidden" in lname or "token_embeddings" in lname) and "attention_mask" in feeds:
            return "feature-extraction", name
        if rank == 2 and any(s in lname for s in ("embedding", "pooler", "sentence")):
            return "feature-extraction", name
        break  # only the primary output decides
    return None, None
