"""The validation report: thresholds, violations, and its JSON / Markdown renderings (PNG: :mod:`ortq.validate.picture`).

A :class:`ValidationReport` wraps the plain dict documented in ``docs/report-schema.md``; it can be rebuilt
from ``report.json`` with :meth:`ValidationReport.load` and re-rendered. matplotlib is optional: without it
the PNG is skipped and the reason is written into the JSON and Markdown.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ortq.errors import ConfigError, MissingDependencyError, OutputError, ValidationFailed
from ortq.validate.generative import generative_markdown
from ortq.validate.picture import render_png

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
# Mean output cosine below which a "quantized" model is not an approximation of its reference at all.
DEFAULT_COSINE_FLOOR = 0.9
# Decoders (the report's ``generative`` entry), per text domain: the largest perplexity increase over fp32, in
# percent, and the lowest share of next tokens whose argmax agrees with fp32's. On SmolLM2-135M
# (benchmarks/llm.py) ortq's int4 gives +1.7 % / 92 %, onnxruntime's HQQ +13 % / 76 %, plain RTN int4
# (onnxruntime's quantizer, the genai builder) +35 % / 62 %: the last fails, a broken model far more so.
DEFAULT_MAX_PPL_INCREASE_PCT = 25.0
DEFAULT_MIN_TOP1_AGREEMENT = 0.65
# Thresholds checked by default (a sanity floor, not a deploy gate the user chose).
_DEFAULT_ON = ("cosine_floor", "max_ppl_increase_pct", "min_top1_agreement")
# Op types that mark a model as quantized (QDQ pairs, integer or low-bit kernels).
QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized", "QLinearConv", "QLinearMatMul",
     "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}
)


@dataclass(frozen=True)
class Thresholds:
    """Limits for deploy gates; None disables a check. Each is checked on every provider that ran.

    Attributes:
        min_cosine: lowest acceptable mean per-sample cosine of the primary output (quantized vs fp32).
        min_sqnr_db: lowest acceptable SQNR (dB) of the primary output.
        max_latency_ratio: highest acceptable quantized / fp32 median latency on the same provider.
        max_abs_error: highest acceptable max absolute error of the primary output.
        min_task_agreement: lowest acceptable task-level agreement (top-k neighbours, argmax, next token).
        max_perplexity_delta_pct: highest acceptable perplexity increase, in percent (language models).
        cosine_floor: a sanity floor on the mean cosine, checked by default: below it the two models do not
            compute the same function (a wrong reference, a broken model), whatever else was asked. None: off.
        max_ppl_increase_pct: decoders, on every text domain of the generative evaluation: highest acceptable
            perplexity increase over fp32, in percent. Checked by default; None: off.
        min_top1_agreement: decoders, on every text domain: lowest acceptable share of next-token argmaxes equal
            to fp32's. Checked by default; None: off.
    """

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    max_latency_ratio: float | None = None
    max_abs_error: float | None = None
    min_task_agreement: float | None = None
    max_perplexity_delta_pct: float | None = None
    cosine_floor: float | None = DEFAULT_COSINE_FLOOR
    max_ppl_increase_pct: float | None = DEFAULT_MAX_PPL_INCREASE_PCT
    min_top1_agreement: float | None = DEFAULT_MIN_TOP1_AGREEMENT

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
                raise ConfigError(f"threshold {f.name} must be a number, got {v!r}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        for name in ("min_task_agreement", "min_top1_agreement"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("max_latency_ratio", "max_abs_error"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive, got {v!r}")

    @property
    def active(self) -> bool:
        """Whether a limit beyond the ones checked by default is set."""
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self) if f.name not in _DEFAULT_ON)

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Thresholds:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown threshold(s): {', '.join(unknown)}")
        return cls(**data)

    def check(self, report: dict[str, Any]) -> list[str]:
        """Every violation, one line each, naming the provider, the figure and the limit."""
        out: list[str] = []
        providers = report.get("providers", [])
        ran = [p for p in providers if p.get("status") == "ok"]
        if providers and not ran:
            reasons = "; ".join(f"{p.get('name')}: {p.get('reason') or p.get('status')}" for p in providers)
            out.append(f"no requested provider ran, so nothing was validated ({reasons})")
        for p in ran:
            name = p.get("name")
            fid = p.get("fidelity") or {}
            lat = p.get("latency") or {}
            task = p.get("task") or {}
            cosine = fid.get("cosine")
            if self.cosine_floor is not None and cosine is not None and not cosine >= self.cosine_floor:
                out.append(
                    f"{name}: cosine {cosine:.4f} is below the sanity floor {self.cosine_floor}: the two models do "
                    "not compute the same function (is the reference the model this one was quantized from?)"
                )
            out += _check_min(name, "cosine", fid.get("cosine"), self.min_cosine, "--min-cosine", ".5f")
            out += _check_min(name, "SQNR", fid.get("sqnr_db"), self.min_sqnr_db, "--min-sqnr", ".2f", " dB")
            out += _check_max(name, "max abs error", fid.get("max_abs_error"), self.max_abs_error, "--max-abs-error", ".4g")
            if self.max_latency_ratio is not None:
                out += _check_max(
                    name, "latency ratio (quantized/fp32 median)", lat.get("ratio"), self.max_latency_ratio,
                    "--max-latency-ratio", ".3f",
                )
            out += _check_min(
                name, f"task agreement ({task.get('metric', 'none')})", task.get("agreement"),
                self.min_task_agreement, "--min-task-agreement", ".4f",
            )
            out += _check_max(
                name, "perplexity delta", task.get("perplexity_delta_pct"), self.max_perplexity_delta_pct,
                "--max-perplexity-delta", ".2f", "%",
            )
        return out + self._check_generative(report.get("generative"))

    def _check_generative(self, gen: dict[str, Any] | None) -> list[str]:
        """Per text domain of the generative evaluation; nothing when it did not run (the report says so)."""
        if not gen or gen.get("status") != "ok":
            return []
        out: list[str] = []
        for domain, d in (gen.get("domains") or {}).items():
            where = f"generative ({domain})"
            out += _check_max(where, "perplexity increase", d.get("perplexity_delta_pct"), self.max_ppl_increase_pct,
                              "--max-ppl-increase", ".2f", "%")
            out += _check_min(where, "top-1 next-token agreement", d.get("top1_agreement"), self.min_top1_agreement,
                              "--min-top1-agreement", ".3f")
        return out


def _check_min(provider, what, value, limit, flag, fmt, unit="") -> list[str]:
    if limit is None:
        return []
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return [f"{provider}: {what} is not available, so {flag} {limit}{unit} cannot be met"]
    if value < limit:
        return [f"{provider}: {what} {value:{fmt}}{unit} < {flag} {limit}{unit}"]
    return []


def _check_max(provider, what, value, limit, flag, fmt, unit="") -> list[str]:
    if limit is None:
        return []
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return [f"{provider}: {what} is not available, so {flag} {limit}{unit} cannot be met"]
    if value > limit:
        return [f"{provider}: {what} {value:{fmt}}{unit} > {flag} {limit}{unit}"]
    return []


def _jsonable(obj: Any) -> Any:
    """JSON without NaN/Infinity: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def _unjson(obj: Any) -> Any:
    if obj in ("inf", "-inf", "nan") and isinstance(obj, str):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unjson(v) for v in obj]
    return obj


def kernel_warnings(report: dict[str, Any]) -> list[str]:
    """A warning per provider on which a quantized model ran no integer or low-bit kernel at all: its
    quantization is emulated in float, so it is no smaller in compute and usually slower than fp32."""
    ops = set((report.get("models", {}).get("quantized", {}) or {}).get("op_types", {}))
    if not ops & QUANTIZED_OPS:
        return []
    out = []
    for p in report.get("providers", []):
        placed = (p.get("placement") or {}).get("quantized")
        if p.get("status") != "ok" or not placed or placed.get("error"):
            continue
        opaque = (placed.get("flops") or {}).get("int8_fraction") is None and p.get("name") == "tensorrt"
        if not opaque and not placed.get("integer_kernels") and not placed.get("nbits_kernels"):
            out.append(
                f"{p.get('name')}: the quantized model runs no integer or low-bit kernel: every quantized node is "
                "emulated in float (QuantizeLinear/DequantizeLinear around float ops), so it is not int8 here"
            )
    return out


class ValidationReport:
    """The result of :func:`ortq.validate.validate`: a dict (``to_dict()``) plus renderings and the verdict."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self._data.setdefault("thresholds", Thresholds().to_dict())
        self._data["violations"] = self.thresholds.check(self._data)
        self._data["warnings"] = kernel_warnings(self._data)
        self._data["ok"] = not self._data["violations"]
        self._data.setdefault("artifacts", {})

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds.from_dict(self._data.get("thresholds"))

    @property
    def violations(self) -> list[str]:
        return list(self._data["violations"])

    @property
    def ok(self) -> bool:
        return not self._data["violations"]

    @property
    def warnings(self) -> list[str]:
        return list(self._data.get("warnings", []))

    @property
    def providers(self) -> list[dict[str, Any]]:
        return self._data.get("providers", [])

    def provider(self, name: str) -> dict[str, Any] | None:
        for p in self.providers:
            if p.get("name") == name:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the report, JSON-ready except for non-finite floats (see :meth:`to_json`)."""
        return copy.deepcopy(self._data)

    def to_json(self) -> str:
        return json.dumps(_jsonable(self._data), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def to_markdown(self) -> str:
        return render_markdown(self._data)

    def raise_for_violations(self) -> None:
        """Raise :class:`ValidationFailed` (exit code 1) listing the violations, if any."""
        if self.violations:
            raise ValidationFailed("; ".join(self.violations))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ValidationReport:
        p = Path(path)
        if p.is_dir():
            p = p / REPORT_JSON
        with open(p, encoding="utf-8") as fh:
            return cls(_unjson(json.load(fh)))

    def save(self, report_dir: str | os.PathLike, *, png: bool = True) -> dict[str, str | None]:
        """Write report.png (when matplotlib is present), report.json and report.md into ``report_dir``.

        Each file is written to a temporary file in the same folder and renamed into place.

        Returns:
            ``{"json": path, "md": path, "png": path or None}``.
        """
        out = Path(report_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create the report folder ({exc.strerror})") from exc
        artifacts: dict[str, Any] = {"json": REPORT_JSON, "md": REPORT_MD, "png": None, "png_skipped_reason": None}
        if png:
            try:
                _write_atomic(out / REPORT_PNG, render_png(self._data))
                artifacts["png"] = REPORT_PNG
            except MissingDependencyError as exc:
                artifacts["png_skipped_reason"] = f"matplotlib is not installed ({exc})"
                logger.warning("report.png skipped: %s", exc)
        else:
            artifacts["png_skipped_reason"] = "not requested"
        self._data["artifacts"] = artifacts
        _write_atomic(out / REPORT_JSON, self.to_json().encode())
        _write_atomic(out / REPORT_MD, self.to_markdown().encode())
        return {
            "json": str(out / REPORT_JSON),
            "md": str(out / REPORT_MD),
            "png": str(out / REPORT_PNG) if artifacts["png"] else None,
        }


def _write_atomic(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        _chmod_default(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _chmod_default(path: str) -> None:
    """mkstemp creates 0600 files; reports are ordinary files, readable as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------- markdown


def _f(v: Any, fmt: str = ".4f", unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
    return f"{v:{fmt}}{unit}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _esc(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(data: dict[str, Any]) -> str:
    """The report as Markdown: verdict, one row per provider, then details."""
    lines: list[str] = []
    q = data.get("models", {}).get("quantized", {})
    r = data.get("models", {}).get("reference", {})
    lines.append("# ortq validation report")
    lines.append("")
    verdict = "**PASS**" if data.get("ok", True) else "**FAIL**"
    lines.append(f"{verdict} — quantized `{q.get('path', '?')}` vs fp32 `{r.get('path', '?')}`")
    lines.append("")
    lines += _checked_lines(data)
    if data.get("violations"):
        lines.append("Violations:")
        lines += [f"- {_esc(v)}" for v in data["violations"]]
        lines.append("")
    if data.get("warnings"):
        lines += [f"**WARNING**: {_esc(w)}" for w in data["warnings"]]
        lines.append("")
    if q.get("size_bytes") and r.get("size_bytes"):
        lines.append(
            f"Size: {r['size_bytes'] / 1e6:.1f} MB fp32 → {q['size_bytes'] / 1e6:.1f} MB quantized "
            f"({q['size_bytes'] / r['size_bytes']:.2f}×)."
        )
    d = data.get("data", {})
    s = data.get("settings", {})
    one_by_one = str(s.get("latency_order", "")).startswith("one")
    order = "runs per model, one model after the other" if one_by_one else "alternating runs per model"
    lines.append(
        f"Data: {_esc(d.get('source'))}; {d.get('num_samples')} samples in {d.get('num_batches')} batches of "
        f"{d.get('batch_size')}. Task: {data.get('task')}. Threads: intra_op={s.get('intra_op_num_threads')}, "
        f"inter_op={s.get('inter_op_num_threads')}. Latency: {s.get('warmup_runs')} warm-up then "
        f"{s.get('latency_runs')} {order}."
    )
    lines.append("")
    lines.append("## Providers")
    lines.append("")
    lines.append(
        "| provider | status | cosine mean / min | max abs err | SQNR dB | task | fp32 ms (p90) | quant ms (p90) "
        "| ratio | int kernels | int8 FLOPs |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in data.get("providers", []):
        if p.get("status") != "ok":
            lines.append(f"| {p.get('name')} | {p.get('status')}: {_esc(p.get('reason'))} |" + " |" * 9)
            continue
        fid = p.get("fidelity") or {}
        lat = p.get("latency") or {}
        task = p.get("task") or {}
        pq = ((p.get("placement") or {}).get("quantized")) or {}
        lr, lq = lat.get("reference") or {}, lat.get("quantized") or {}
        kernels = sum((pq.get("integer_kernels") or {}).values()) + sum((pq.get("nbits_kernels") or {}).values())
        flops = pq.get("flops") or {}
        task_s = "–"
        if task:
            task_s = f"{task.get('metric')} {_f(task.get('agreement'), '.3f')}"
            if task.get("perplexity_delta_pct") is not None:
                task_s += f", ppl {_f(task['perplexity_delta_pct'], '+.2f')}%"
        lines.append(
            f"| {p['name']} | ok | {_f(fid.get('cosine'), '.5f')} / {_f(fid.get('cosine_min'), '.5f')} "
            f"| {_f(fid.get('max_abs_error'), '.4g')} | {_f(fid.get('sqnr_db'), '.2f')} | {task_s} "
            f"| {_f(lr.get('median_ms'), '.2f')} ({_f(lr.get('p90_ms'), '.2f')}) "
            f"| {_f(lq.get('median_ms'), '.2f')} ({_f(lq.get('p90_ms'), '.2f')}) | {_f(lat.get('ratio'), '.3f')} "
            f"| {kernels if pq else '–'} | {_pct(flops.get('int8_fraction')) if pq else '–'} |"
        )
    lines.append("")
    lines.append("ratio = quantized / fp32 median latency on the same provider (below 1 is faster).")
    lines.append("")
    lines += generative_markdown(data.get("generative"))
    for p in data.get("providers", []):
        if p.get("status") != "ok":
            continue
        lines += _provider_details(p)
    lines += _host_section(data.get("host", {}))
    art = data.get("artifacts") or {}
    if art.get("png_skipped_reason"):
        lines.append(f"report.png skipped: {_esc(art['png_skipped_reason'])}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _checked_lines(data: dict[str, Any]) -> list[str]:
    """What the verdict covers, and what did not run."""
    ran = [p.get("name") for p in data.get("providers", []) if p.get("status") == "ok"]
    checked = [f"outputs on {', '.join(ran)}"] if ran else []
    gen = data.get("generative") or {}
    if gen.get("status") == "ok":
        checked.append("generative metrics on " + ", ".join(gen.get("domains") or {}))
    lines = [f"Checked: {'; '.join(checked) or 'nothing'}."]
    if gen and gen.get("status") != "ok":
        lines.append(f"Generative evaluation NOT run: {_esc(gen.get('reason'))}.")
    for domain, why in (gen.get("skipped_domains") or {}).items():
        lines.append(f"Text domain {domain} NOT evaluated: {_esc(why)}.")
    return lines + [""]


def _provider_details(p: dict[str, Any]) -> list[str]:
    lines = [f"## {p['name']} ({p.get('execution_provider')})", ""]
    fid = p.get("fidelity") or {}
    outs = fid.get("outputs") or {}
    if outs:
        lines.append("| output | cosine mean | cosine min | max abs err | mean abs err | SQNR dB | min sample SQNR dB |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, o in outs.items():
            lines.append(
                f"| {_esc(name)} | {_f(o.get('cosine_mean'), '.5f')} | {_f(o.get('cosine_min'), '.5f')} "
                f"| {_f(o.get('max_abs_error'), '.4g')} | {_f(o.get('mean_abs_error'), '.4g')} "
                f"| {_f(o.get('sqnr_db'), '.2f')} | {_f(o.get('sqnr_db_min'), '.2f')} |"
            )
        lines.append("")
    task = p.get("task")
    if task:
        extra = ", ".join(
            f"{k} {_f(v, '.4f') if isinstance(v, float) else v}"
            for k, v in task.items()
            if k not in ("task", "metric", "output")
        )
        lines.append(f"Task ({task.get('task')}, output `{task.get('output')}`): {task.get('metric')}; {extra}.")
        lines.append("")
    par = p.get("parity_vs_cpu")
    if par:
        lines.append(
            f"Parity with CPU (`{par.get('output')}`): fp32 cosine {_f(par['reference'].get('cosine_min'), '.6f')} "
            f"(min), max abs {_f(par['reference'].get('max_abs_error'), '.3g')}; quantized cosine "
            f"{_f(par['quantized'].get('cosine_min'), '.6f')} (min), max abs {_f(par['quantized'].get('max_abs_error'), '.3g')}."
        )
        lines.append("")
    lat = p.get("latency")
    if lat:
        lines.append(
            f"Latency (batch {lat.get('batch_size')}): first run fp32 {_f(lat['reference'].get('first_run_ms'), '.1f')} ms, "
            f"quantized {_f(lat['quantized'].get('first_run_ms'), '.1f')} ms; throughput fp32 "
            f"{_f(lat['reference'].get('throughput_per_s'), '.1f')}/s, quantized "
            f"{_f(lat['quantized'].get('throughput_per_s'), '.1f')}/s; median of pairwise ratios "
            f"{_f(lat.get('pairwise_ratio_median'), '.3f')}."
        )
        lines.append("")
    pl = p.get("placement") or {}
    if pl.get("error"):
        lines.append(f"Placement: {_esc(pl['error'])}")
        lines.append("")
    for which in ("quantized", "reference"):
        x = pl.get(which)
        if not x:
            continue
        fl = x.get("flops") or {}
        g = x.get("qdq_groups") or {}
        lines.append(f"Placement of the {which} model: {x.get('source_nodes')} nodes → {x.get('optimized_nodes')} after optimization.")
        lines.append(f"- nodes per provider: {_kv(x.get('nodes_per_provider'))}")
        if which == "quantized":
            lines.append(f"- integer kernels: {_kv(x.get('integer_kernels')) or 'none'}")
            if x.get("nbits_kernels"):
                lines.append(f"- low-bit weight kernels: {_kv(x.get('nbits_kernels'))}")
            if x.get("qlinear_elementwise"):
                lines.append(f"- integer element-wise kernels: {_kv(x.get('qlinear_elementwise'))}")
            lines.append(f"- float MatMul/Gemm/Conv left: {_kv(x.get('float_matmuls')) or 'none'}")
            lines.append(f"- Q/DQ nodes left unfused: {_kv(x.get('unfused_qdq')) or 'none'}")
            if g.get("total"):
                lines.append(f"- QDQ groups fused into integer kernels: {g.get('fused')} of {g.get('total')}")
                if g.get("unfused"):
                    shown = ", ".join(f"`{_esc(n)}`" for n in g["unfused"][:12])
                    more = f" and {len(g['unfused']) - 12} more" if len(g["unfused"]) > 12 else ""
                    lines.append(f"  - still float (QDQ emulated): {shown}{more}")
            lines.append(
                f"- MatMul/Gemm/Conv FLOPs in int8: {_pct(fl.get('int8_fraction'))}, in low-bit weight kernels: "
                f"{_pct(fl.get('nbits_fraction'))}; of the MatMuls by a constant weight: "
                f"{_pct(fl.get('weight_matmul_int8_fraction'))} int8, {_pct(fl.get('weight_matmul_nbits_fraction'))} low-bit"
            )
        other = {k: v for k, v in (x.get("nodes_per_provider") or {}).items() if k != p.get("execution_provider")}
        if p.get("name") != "cpu" and other:
            lines.append(f"- nodes NOT on {p.get('execution_provider')}: {_kv(other)}")
        for n in x.get("notes") or []:
            lines.append(f"- note: {_esc(n)}")
        lines.append("")
    return lines


def _kv(d: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items())


def _host_section(h: dict[str, Any]) -> list[str]:
    if not h:
        return []
    feats = [k for k, v in (h.get("cpu_features") or {}).items() if v]
    gpus = "; ".join(f"{g.get('name')} ({g.get('memory', '?')})" for g in h.get("gpus") or []) or "none"
    return [
        "## Host",
        "",
        f"- CPU: {h.get('cpu')} ({h.get('machine')}, {h.get('logical_cpus')} logical CPUs)",
        f"- CPU features: {', '.join(feats) or 'none detected'}",
        f"- int8 kernel path: {h.get('int8_kernel_path')}",
        f"- GPU: {gpus}",
        f"- onnxruntime {h.get('onnxruntime')} ({h.get('onnxruntime_package')}); providers: "
        f"{', '.join(h.get('onnxruntime_providers') or [])}",
        f"- onnx {h.get('onnx')}, numpy {h.get('numpy')}, python {h.get('python')}, ortq {h.get('ortq')}, {h.get('os')}",
        "",
    ]


# --------------------------------------------------------------------------------------------------- png
