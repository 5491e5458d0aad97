"""The ``ortq`` command: export | quantize | validate | generate | run.

Every error a user can cause ends in one line, ``error: ...``, and a non-zero exit; ``--debug`` shows the
traceback. SIGINT and SIGTERM stop the run without leaving outputs or temporary files behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ortq import progress
from ortq.config import PRESETS
from ortq.errors import ConfigError, Interrupted, OrtqError
from ortq.recipes import DEFAULT_RECIPE, list_recipes
from ortq.tasks import TASKS, normalize_task

logger = logging.getLogger("ortq")

EXIT_INTERNAL = 3


# ------------------------------------------------------------------------------------------------ helpers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _providers(text: str) -> tuple[str, ...]:
    items = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as cpu,cuda")
    return items


def _task(text: str) -> str:
    try:
        return normalize_task(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _task_or_none(text: str) -> str:
    return "none" if text.strip().lower() == "none" else _task(text)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error:`` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------------------------- commands


def _cmd_export(args: argparse.Namespace) -> int:
    from ortq.export import export

    result = export(
        args.model,
        args.output,
        task=args.task,
        opset=args.opset,
        overwrite=args.overwrite,
        fused_attention=not args.no_fused_attention,
    )
    attention = f", attention {result.attention}" if result.task == "causal-lm" else ""
    print(f"exported {result.path} (task {result.task}{attention}, max abs diff vs torch {result.max_abs_diff:.2e})")
    return 0


def _weight_only_config(args: argparse.Namespace):
    from ortq.config import WeightOnlyConfig

    bits = {"int4": 4, "int8": 8}[args.weight_only]
    # Options left unset keep WeightOnlyConfig's defaults.
    optional = {"symmetric": args.symmetric, "keep_source_grid": args.keep_source_grid,
                "sensitive_budget": args.sensitive_budget, "algorithm": args.algorithm,
                "block_offsets": args.block_offsets, "bias_correction": args.bias_correction,
                "max_offset_layers": args.max_offset_layers, "fold_block_offsets": args.fold_block_offsets}
    return WeightOnlyConfig(
        bits=bits,
        block_size=args.block_size,
        accuracy_level=None if args.accuracy_level == "unset" else int(args.accuracy_level),
        int8_nodes=tuple(args.int8_nodes or ()),
        nodes_to_exclude=tuple(args.exclude or ()),
        auto_int8_sensitive=not args.no_auto_int8,
        quantize_embeddings=not args.no_quantize_embeddings,
        int8_block_size=args.int8_block_size,
        **{k: v for k, v in optional.items() if v is not None},
    )


def _static_config(args: argparse.Namespace):
    from ortq.config import AutoQuantizationConfig

    kwargs: dict[str, Any] = {"per_channel": not args.per_tensor}
    if args.exclude:
        kwargs["nodes_to_exclude"] = tuple(args.exclude)
    if args.operators:
        kwargs["operators_to_quantize"] = tuple(o.strip() for o in args.operators.split(",") if o.strip())
    if args.smooth_quant is not None:
        kwargs["smooth_quant_alpha"] = args.smooth_quant
    if args.int4_weights:
        kwargs["weight_storage_bits"] = 4
        kwargs["storage_block_size"] = args.block_size
    return AutoQuantizationConfig.from_name(args.preset, **kwargs)


def _default_calibration_data(input_path: Path, num_samples: int | None) -> Any:
    """Without --calibration-data, text models calibrate on real offline English sentences."""
    from ortq.data import real_text
    from ortq.io import has_tokenizer

    if not has_tokenizer(input_path):
        raise ConfigError(
            "--calibration-data is required for a model without tokenizer files "
            "(give .npz arrays keyed by graph input name, or a text/jsonl file for an exported folder)"
        )
    logger.info("no --calibration-data: using real English sentences shipped with Python")
    return real_text("calibration", num_samples or 256)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ortq.config import AutoCalibrationConfig
    from ortq.quantizer import ORTQuantizer

    quantizer = ORTQuantizer.from_pretrained(args.input)
    quantizer.show_progress = not args.quiet
    engine = None
    if args.ray:
        from ortq.calibrators.engine import RayEngine

        engine = RayEngine(None if args.ray == "local" else args.ray, num_workers=args.ray_workers)
    if args.weight_only:
        if args.algorithm is None:
            # The same default as WeightOnlyConfig(): gptq; without --calibration-data the quantizer
            # calibrates a text model on mixed-domain passages and falls back to rtn without a tokenizer.
            from ortq.config import WeightOnlyConfig

            args.algorithm = WeightOnlyConfig().algorithm.value
        config = _weight_only_config(args)
        data = args.calibration_data
        calib = AutoCalibrationConfig.minmax(num_samples=args.num_samples) if args.num_samples else None
        path = quantizer.quantize(
            config, args.output, calibration_data=data, calibration_config=calib, overwrite=args.overwrite,
            engine=engine,
        )
    else:
        config = _static_config(args)
        calib = AutoCalibrationConfig.from_method(
            args.method, num_samples=args.num_samples, batch_size=args.batch_size
        )
        data = args.calibration_data or _default_calibration_data(Path(args.input), args.num_samples)
        report_data = None
        if (args.error_report or args.max_cosine_drop is not None) and not args.calibration_data:
            from ortq.data import real_text

            report_data = real_text("heldout", 64)
        path = quantizer.quantize(
            config,
            args.output,
            calibration_data=data,
            calibration_config=calib,
            overwrite=args.overwrite,
            max_cosine_drop=args.max_cosine_drop,
            error_report=args.error_report,
            report_data=report_data,
            engine=engine,
        )
        budget = (quantizer.last_report or {}).get("accuracy_budget")
        if budget:
            kept = budget.get("kept_float") or []
            which = f"{len(kept)} node(s) kept in float: {', '.join(kept)}" if kept else "no node kept in float"
            print(f"accuracy budget met: {budget.get('met')}; {which}")
    report = quantizer.last_report or {}
    plan = report.get("plan", {})
    if plan:
        print(
            f"wrote {path}: {plan.get('num_quantized', 0)} of {plan.get('num_nodes', 0)} nodes quantized "
            f"(preset {getattr(config, 'preset', None)}); plan in {Path(path).parent / 'quantization_report.json'}"
        )
    else:
        print(f"wrote {path}")
    return 0


# Options that only mean something for a decoder language model: giving one asks for the generative evaluation.
_GENERATIVE_FLAGS = {"eval_text": "--eval-text", "eval_passages": "--eval-passages", "max_length": "--max-length",
                     "new_tokens": "--new-tokens", "max_ppl_increase": "--max-ppl-increase",
                     "min_top1_agreement": "--min-top1-agreement"}


def _generative_request(args: argparse.Namespace):
    """None (automatic), False (--no-generative) or the GenerativeOptions the user asked for."""
    from ortq.validate import GenerativeOptions

    given = [flag for key, flag in _GENERATIVE_FLAGS.items() if getattr(args, key) is not None]
    if args.no_generative:
        if given:
            raise ConfigError(f"--no-generative contradicts {', '.join(given)}")
        return False
    defaults = GenerativeOptions()
    options = GenerativeOptions(
        eval_text=args.eval_text,
        num_passages=args.eval_passages or defaults.num_passages,
        max_length=args.max_length or defaults.max_length,
        new_tokens=defaults.new_tokens if args.new_tokens is None else args.new_tokens,
    )
    return options if given else None


def _cmd_validate(args: argparse.Namespace) -> int:
    from ortq.validate import Thresholds, validate
    from ortq.validate.report import DEFAULT_MAX_PPL_INCREASE_PCT, DEFAULT_MIN_TOP1_AGREEMENT

    generative = _generative_request(args)
    thresholds = Thresholds(
        min_cosine=args.min_cosine,
        min_sqnr_db=args.min_sqnr,
        max_latency_ratio=args.max_latency_ratio,
        max_abs_error=args.max_abs_error,
        min_task_agreement=args.min_task_agreement,
        max_perplexity_delta_pct=args.max_perplexity_delta,
        max_ppl_increase_pct=DEFAULT_MAX_PPL_INCREASE_PCT if args.max_ppl_increase is None else args.max_ppl_increase,
        min_top1_agreement=DEFAULT_MIN_TOP1_AGREEMENT if args.min_top1_agreement is None else args.min_top1_agreement,
    )
    report = validate(
        args.quantized,
        args.reference,
        data=args.data,
        providers=args.providers,
        require=args.require or (),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        thresholds=thresholds,
        report_dir=args.report_dir,
        task=args.task,
        latency_runs=args.latency_runs,
        generative=generative,
    )
    print(report.to_markdown())
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not report.ok:
        for v in report.violations:
            print(f"error: {v}", file=sys.stderr)
        return 1
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from ortq.generate import Generator, SamplingConfig

    sampling = SamplingConfig(
        do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    generator = Generator(args.model, provider=args.provider, threads=args.threads, engine=args.engine)
    result = generator.generate(args.prompt, args.max_new_tokens, sampling)
    print(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    prefill, decode = result.prefill_tokens_per_s, result.decode_tokens_per_s
    print(
        f"{len(result.prompt_ids)} prompt tokens, {len(result.token_ids)} new ({result.engine}): prefill "
        f"{prefill:.1f} tokens/s, decode " + (f"{decode:.1f} tokens/s" if decode else "-"),
        file=sys.stderr,
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ortq.pipeline import run_recipe

    result = run_recipe(
        args.recipe,
        work_dir=args.work_dir,
        num_samples=args.num_samples,
        with_int4=not args.no_int4,
        overwrite=True,
    )
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ortq", description="Export, quantize and validate ONNX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("export", help="export a Hugging Face folder / name to ONNX")
    p.add_argument("model", help="a Hugging Face model folder (or .gguf file), or a model name in the local cache")
    p.add_argument("--output", "-o", required=True, help="output folder (model.onnx + tokenizer files)")
    p.add_argument(
        "--task",
        type=_task,
        metavar="TASK",
        help=f"the head to export: {', '.join(TASKS)} (default: from config.architectures)",
    )
    p.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset of the graph, 11-23 (default 17)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
    p.add_argument(
        "--no-fused-attention",
        action="store_true",
        help="causal-lm: keep attention as standard ONNX ops instead of ONNX Runtime's GroupQueryAttention",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize", help="quantize an ONNX model (static QDQ int8 or weight-only int4)")
    p.add_argument("input", help="a .onnx file or an exported folder")
    p.add_argument("--output", "-o", required=True, help="output folder; gets model.onnx")
    p.add_argument(
        "--calibration-data",
        help="txt / jsonl / csv / parquet / npz (default for text models: real English sentences)",
    )
    p.add_argument(
        "--method", default="minmax", choices=["minmax", "percentile", "entropy"], help="range calibrator (default minmax)"
    )
    p.add_argument("--num-samples", type=_positive_int, help="calibration samples to use")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="samples per calibration run (default 16)")
    p.add_argument("--ray", metavar="ADDRESS", help="calibrate on a Ray cluster: auto, local, or ray://host:port "
                   "(pip install 'ortq[ray]'); ranges are the same bits as without")
    p.add_argument("--ray-workers", type=_positive_int, help="Ray workers (default: one per CPU of the cluster)")
    p.add_argument(
        "--preset",
        default="auto",
        choices=["auto", *PRESETS],
        help="int8 preset (auto: detect this CPU)",
    )
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales")
    p.add_argument("--operators", help="comma-separated op types to quantize (default MatMul,Gemm,Conv)")
    p.add_argument("--exclude", action="append", metavar="NODE", help="node name or glob kept in float")
    p.add_argument("--smooth-quant", type=_float, metavar="ALPHA", help="SmoothQuant strength in [0, 1]")
    p.add_argument(
        "--max-cosine-drop",
        type=_float,
        metavar="DROP",
        help="accuracy budget: keep the fewest nodes in float so that 1 - cosine to fp32 <= DROP",
    )
    p.add_argument("--error-report", action="store_true", help="write layer_report.{json,md,png} (per-layer error)")
    p.add_argument("--weight-only", choices=["int4", "int8"], help="weight-only MatMulNBits instead of QDQ")
    p.add_argument(
        "--int4-weights",
        action="store_true",
        help="static int8 with MatMul weights stored as 4-bit blocks (--block-size), unpacked to int8 at load",
    )
    p.add_argument(
        "--block-size", type=_positive_int, default=32, help="weights per 4-bit scale (power of two >= 16; default 32)"
    )
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric weight-only blocks, no zero points (default: WeightOnlyConfig's)")
    p.add_argument("--keep-source-grid", action=argparse.BooleanOptionalAction, default=None,
                   help="weight-only: carry every weight already on a block grid (GGUF Q4_0 / Q4_1 / Q8_0) as it is "
                   "instead of re-quantizing it (default: WeightOnlyConfig's)")
    p.add_argument("--sensitive-budget", type=float, default=None, metavar="FRACTION",
                   help="weight-only: extra bytes, as a fraction of the 4-bit layers' bytes, for the layers with the "
                   "largest measured error (their source grid, else 8 bits; 0: none)")
    p.add_argument("--block-offsets", action=argparse.BooleanOptionalAction, default=None,
                   help="weight-only: a layer the budget upgrades may carry a grid that needs per-block offsets "
                   "(extra run time per layer; --no-block-offsets: 8 bits instead)")
    p.add_argument("--fold-block-offsets", action=argparse.BooleanOptionalAction, default=None,
                   help="weight-only: store block offsets as extra 4-bit rows of the layer's MatMulNBits (the default: "
                   "faster; a weight moves by a fraction of a step); --no-fold-block-offsets: exact, in float")
    p.add_argument("--max-offset-layers", type=int, default=None, metavar="N",
                   help="weight-only: at most N layers carry a grid with block offsets, the ones that gain most "
                   "per byte (each costs run time; the others go to 8 bits)")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="weight-only: give re-quantized layers their mean output error on the calibration data back "
                   "as a bias (free at run time; default: WeightOnlyConfig's)")
    p.add_argument(
        "--accuracy-level",
        choices=["0", "1", "2", "3", "4", "unset"],
        default="4",
        help="MatMulNBits accuracy_level (4: int8 activations, the fast CPU path; unset: omit the attribute)",
    )
    p.add_argument(
        "--algorithm",
        choices=["rtn", "gptq"],
        help="weight-only algorithm (default gptq, as WeightOnlyConfig(); without --calibration-data a text "
        "model calibrates on mixed-domain passages, a model without a tokenizer falls back to rtn)",
    )
    p.add_argument("--int8-block-size", type=_positive_int, help="block size of the 8-bit weight-only layers")
    p.add_argument("--no-auto-int8", action="store_true", help="do not keep lm_head / tied layers at 8 bits")
    p.add_argument("--no-quantize-embeddings", action="store_true", help="keep embedding tables in float")
    p.add_argument("--int8-nodes", action="append", metavar="NODE", help="weight-only: keep these at 8 bits")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("validate", help="compare a quantized model with its fp32 reference")
    p.add_argument("quantized", help="quantized .onnx or folder")
    p.add_argument("--reference", required=True, help="fp32 .onnx or folder")
    p.add_argument("--data", help="held-out data (default for text models: held-out real sentences)")
    p.add_argument("--providers", type=_providers, default=("cpu",), help="e.g. cpu,cuda,tensorrt")
    p.add_argument("--require", type=_providers, help="providers that must be available")
    p.add_argument("--num-samples", type=_positive_int, default=64, help="held-out samples to compare on (default 64)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="samples per run (default 16)")
    p.add_argument("--report-dir", help="write report.json, report.md and report.png here")
    p.add_argument("--min-cosine", type=_float, help="minimum mean output cosine to the reference")
    p.add_argument("--min-sqnr", type=_float, help="minimum SQNR in dB")
    p.add_argument("--max-latency-ratio", type=_float, help="maximum quantized / fp32 median latency")
    p.add_argument("--max-abs-error", type=_float, help="maximum absolute output error")
    p.add_argument("--min-task-agreement", type=_float, help="top-k / argmax agreement in [0, 1]")
    p.add_argument("--max-perplexity-delta", type=_float, help="causal LMs: maximum perplexity increase in %%")
    p.add_argument(
        "--task",
        type=_task_or_none,
        metavar="TASK",
        help=f"task metric: {', '.join(TASKS)} or none (default: guessed from the primary output)",
    )
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per model (0: skip latency)")
    g = p.add_argument_group(
        "decoder language models",
        "A decoder exported with its KV cache is also judged as a language model: perplexity and next-token "
        "agreement with fp32 on held-out passages (python-docs and, when installed, news), greedy continuations, "
        "prefill / decode tokens/s and peak memory. Any option below asks for it (an error for other models).",
    )
    g.add_argument("--no-generative", action="store_true", help="skip the language-model evaluation")
    g.add_argument("--eval-text", metavar="FILE", help="evaluate on this UTF-8 text (passages split at blank lines)")
    g.add_argument("--eval-passages", type=_positive_int, metavar="N", help="passages per text domain (default 8)")
    g.add_argument("--max-length", type=_positive_int, metavar="N", help="tokens per passage at most (default 256)")
    g.add_argument("--new-tokens", type=int, metavar="N", help="tokens per greedy continuation (default 32; 0: none)")
    g.add_argument("--max-ppl-increase", type=_float, metavar="PCT",
                   help="maximum perplexity increase over fp32 on each text domain, in %% (default 25)")
    g.add_argument("--min-top1-agreement", type=_float, metavar="F",
                   help="minimum share of next tokens equal to fp32's argmax on each domain (default 0.65)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("generate", help="generate text with a decoder exported with its KV cache")
    p.add_argument("model", help="an exported or quantized causal-lm folder (or its .onnx file)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=_float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    p.add_argument("--seed", type=int, help="random seed of the sampler")
    p.add_argument("--engine", choices=["ort", "genai"], default="ort",
                   help="ort: ortq's loop on ONNX Runtime; genai: onnxruntime-genai (pip install 'ortq[llm]')")
    p.add_argument("--provider", default="cpu", help="cpu, cuda or tensorrt (ort engine)")
    p.add_argument("--threads", type=_positive_int, help="intra-op threads (default: one per core)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("run", help="export -> quantize -> validate a recipe from graphs/")
    p.add_argument(
        "recipe",
        nargs="?",
        default=None,
        help=f"recipe name ({', '.join(list_recipes())}) or a .toml path (default: {DEFAULT_RECIPE})",
    )
    p.add_argument("--work-dir", help="keep outputs here (default: a temporary folder, removed at the end)")
    p.add_argument("--num-samples", type=_positive_int, help="calibration samples")
    p.add_argument("--no-int4", action="store_true", help="skip the int4 weight-only row")
    p.add_argument("--json", help="also write the results as JSON here")
    p.set_defaults(func=_cmd_run)
    return parser


@contextlib.contextmanager
def _signals_raise_interrupt():
    """SIGTERM behaves like Ctrl-C, so the same cleanup paths run."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_onnxruntime() -> None:
    """ONNX Runtime logs its own failures to stderr; ortq reports them as its one ``error:`` line instead."""
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(4)  # fatal only; --debug keeps ONNX Runtime's warnings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        progress.set_enabled(False)
    if not args.debug:
        logging.getLogger("onnx_ir").setLevel(logging.WARNING)
        _quiet_onnxruntime()
    start = time.perf_counter()
    try:
        with _signals_raise_interrupt():
            code = args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return Interrupted.exit_code
    except OrtqError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print("error: out of memory; use fewer --num-samples or a smaller --batch-size", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # a bug: one line for users, the traceback with --debug
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error ({type(exc).__name__}: {first}); rerun with --debug", file=sys.stderr)
        return EXIT_INTERNAL
    logger.debug("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
