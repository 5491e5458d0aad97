"""What is exported: the module, its graph inputs and outputs, dynamic axes and the parity inputs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ortq.errors import ConfigError, ExportError, require
from ortq.tasks import TASK_SPECS

logger = logging.getLogger(__name__)


PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime executes the exported graph on CPUs and GPUs; quantization makes it smaller and faster, "
    "provided the accuracy stays where it was.",
    "Hello!",
    "A model is exported once and deployed many times, so the export has to be right.",
)


@dataclass
class ExportSpec:
    """What to trace: a module taking positional tensors named ``input_names``, and sample inputs."""

    module: Any
    task: str | None
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    example: tuple[Any, ...]
    parity: list[tuple[Any, ...]]  # input tuples for the parity check
    masks: list[Any]  # attention masks of the parity inputs (None: compare every position)
    kv_cache: tuple[int, int, int] | None = None  # (layers, kv_heads, head_dim) of a decoder with past
    context_length: int | None = None  # the longest sequence the model was trained for
    custom_opsets: dict[str, int] | None = None  # domains of contrib ops the module's symbolics emit


def _keyword_wrapper(model: Any, input_names: Sequence[str], output_name: str, extra: Mapping[str, Any]):
    """A module taking positional tensors that calls a transformers model by keyword and returns one output.

    transformers >= 5 models must be called with keyword arguments; the exporters pass positional ones.
    """
    torch = require("torch", "export")

    class KeywordWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(**dict(zip(input_names, args, strict=True)), **extra)
            return out[output_name]

    return KeywordWrapper().eval()


def task_io(model, task: str, input_names, output_names, *, required: str) -> tuple[list[str], str, list[str]]:
    """The graph inputs of ``task`` that ``model.forward`` takes (``required`` among them), the task's output
    and the output names: ``(inputs, output, outputs)``."""
    params = inspect.signature(model.forward).parameters
    names = [n for n in (input_names or TASK_SPECS[task].inputs) if n in params]
    if required not in names:
        hint = "; pass a torch module instead" if required == "input_ids" else ""
        raise ExportError(f"{type(model).__name__} does not take {required}{hint}")
    output_name = TASK_SPECS[task].output
    outputs = list(output_names or [output_name])
    if len(outputs) != 1:
        raise ConfigError(f"task {task} has one output ({output_name}); got output_names={outputs}")
    return names, output_name, outputs


def transformers_spec(
    model, tokenizer, task, example_inputs, input_names, output_names, dynamic_axes, max_length
) -> ExportSpec:
    names, output_name, outputs = task_io(model, task, input_names, output_names, required="input_ids")
    extra = {"use_cache": False} if TASK_SPECS[task].generative else {}
    if TASK_SPECS[task].generative:
        model.config.use_cache = False
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
        dynamic_axes[outputs[0]] = {0: "batch_size", 1: "sequence_length"}
    module = _keyword_wrapper(model, names, output_name, extra)

    limit = max_positions(model.config, max_length)
    if example_inputs is not None:
        example = _as_tuple(example_inputs, names)
    else:
        example = text_inputs(tokenizer, model.config, names, list(PARITY_TEXTS[:2]), limit, pad_to=16)[0]
    parity = [
        text_inputs(
            tokenizer, model.config, names, [PARITY_TEXTS[1], PARITY_TEXTS[2], PARITY_TEXTS[3]], limit
        ),
        text_inputs(tokenizer, model.config, names, [PARITY_TEXTS[0]], limit),
    ]
    return ExportSpec(
        module=module,
        task=task,
        input_names=names,
        output_names=outputs,
        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
        example=example,
        parity=[p[0] for p in parity],
        masks=[p[1] for p in parity],
    )


def max_positions(config, max_length: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None) or 512
    return min(limit, max_length) if max_length else min(limit, 128)


def text_inputs(tokenizer, config, names, texts, max_length, pad_to=None):
    """Tokenized ``texts`` as a tuple ordered like ``names``, and the attention mask (numpy)."""
    torch = require("torch", "export")
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer(
            texts,
            padding="max_length" if pad_to else "longest",
            max_length=min(pad_to or max_length, max_length),
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    else:  # random tokens of lengths that follow the texts', right-padded
        gen = torch.Generator().manual_seed(0)
        lengths = [min(max(2, len(t.split()) * 2), max_length) for t in texts]
        seq = pad_to or max(lengths)
        vocab = int(getattr(config, "vocab_size", 1000))
        ids = torch.randint(1, vocab, (len(texts), seq), generator=gen)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, : min(n, seq)] = 1
        ids = ids * mask + (getattr(config, "pad_token_id", None) or 0) * (1 - mask)
    values = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    return tuple(values[n] for n in names), mask.numpy().astype(bool)


def _as_tuple(example_inputs, names) -> tuple:
    torch = require("torch", "export")
    if isinstance(example_inputs, Mapping):
        missing = [n for n in names if n not in example_inputs]
        if missing:
            raise ConfigError(f"example_inputs lack {', '.join(missing)}")
        return tuple(example_inputs[n] for n in names)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def module_spec(module, example_inputs, input_names, output_names, dynamic_axes) -> ExportSpec:
    torch = require("torch", "export")
    if example_inputs is None:
        raise ConfigError("exporting a torch.nn.Module needs example_inputs (a tensor, tuple or dict)")
    if isinstance(example_inputs, Mapping):
        names = list(input_names or example_inputs)
        example = tuple(example_inputs[n] for n in names)
        keyword_names = list(example_inputs)
        inner = module

        class KeywordModule(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.module = inner

            def forward(self, *args):
                return self.module(**dict(zip(keyword_names, args, strict=True)))

        module = KeywordModule()
        example = tuple(example_inputs[n] for n in keyword_names)
    else:
        example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        names = list(
            input_names or [f"input_{i}" if len(example) > 1 else "input" for i in range(len(example))]
        )
    if len(names) != len(example):
        raise ConfigError(f"{len(names)} input_names for {len(example)} example inputs")
    module.eval()
    with torch.no_grad():
        out = module(*example)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    outputs = list(output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]))
    if dynamic_axes is None:
        dynamic_axes = {}
        for n, x in zip(names, example, strict=True):
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                dynamic_axes[n] = {0: "batch_size"}
        for n in outputs:
            dynamic_axes[n] = {0: "batch_size"}
    return ExportSpec(
        module=module,
        task=None,
        input_names=names,
        output_names=outputs,
        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
        example=example,
        parity=[example],
        masks=[None],
    )
