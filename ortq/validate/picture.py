"""``report.png``: the validation verdict as a picture a person reads in five seconds.

A headline (PASS / FAIL and the one-line summary), then one panel per question, every bar labelled with its
number: does it compute the same thing (cosine, mean and worst sample, per provider), is it faster (fp32 and
quantized latency with the speedup), is it smaller (MB), and does the task still come out the same (agreement,
perplexity change). Axes never use offsets: a cosine of 0.9984 reads as 0.9984.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ortq.errors import require

_GREEN, _RED, _GREY, _BLUE, _ORANGE = "#2e7d32", "#c62828", "#9e9e9e", "#1f77b4", "#ef6c00"


def _metric(task: dict[str, Any]) -> str:
    """``top5_neighbour_agreement`` -> ``top-5 neighbours``: the task metric in words."""
    name = str(task.get("metric") or "task").replace("_agreement", "")
    if name.startswith("top") and "_" in name:
        k, _, what = name[3:].partition("_")
        return f"top-{k} {what.replace('_', ' ')}s"
    return name.replace("_", " ")


def _ran(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in data.get("providers", []) if p.get("status") == "ok"]


def headline(data: dict[str, Any]) -> str:
    """``PASS — cpu: cosine 0.9984 (worst 0.9961), 2.01x faster, 3.7x smaller, top-5 agreement 0.945``."""
    verdict = "PASS" if data.get("ok", True) else "FAIL"
    ran = _ran(data)
    if not ran:
        return f"{verdict} — no provider ran"
    p = ran[0]
    parts = []
    fid = p.get("fidelity") or {}
    if fid.get("cosine") is not None:
        parts.append(f"cosine {fid['cosine']:.4f} (worst {fid.get('cosine_min', float('nan')):.4f})")
    ratio = (p.get("latency") or {}).get("ratio")
    if ratio:
        parts.append(f"{1 / ratio:.2f}x faster" if ratio <= 1 else f"{ratio:.2f}x slower")
    models = data.get("models", {})
    q, r = (models.get(k, {}).get("size_bytes") for k in ("quantized", "reference"))
    if q and r:
        parts.append(f"{r / q:.1f}x smaller")
    task = p.get("task") or {}
    if task.get("agreement") is not None:
        parts.append(f"{_metric(task)} agreement {task['agreement']:.3f}")
    return f"{verdict} — {p.get('name')}: " + ", ".join(parts)


def _bars(ax, title: str, rows: list[tuple[str, float, str, str]], *, empty: str, left: float = 0.0,
          right: float | None = None) -> None:
    """One panel: a labelled horizontal bar per ``(label, value, text, color)`` row, or ``empty`` in grey."""
    ax.set_title(title, fontsize=9, loc="left")
    if not rows:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color=_GREY)
        ax.set_axis_off()
        return
    labels, values, texts, colors = zip(*rows, strict=True)
    bars = ax.barh(range(len(rows)), [v - left for v in values], left=left, color=colors, height=0.6)
    for bar, text in zip(bars, texts, strict=True):
        ax.text(bar.get_x() + bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}",
                va="center", ha="left", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(left, right if right is not None else max(values) * 1.7)


def _fidelity(ax, data: dict[str, Any]) -> None:
    floor = (data.get("thresholds") or {}).get("cosine_floor")
    rows = []
    for p in _ran(data):
        fid = p.get("fidelity") or {}
        if fid.get("cosine") is not None:
            for which, value in (("mean", fid["cosine"]), ("worst", fid.get("cosine_min", fid["cosine"]))):
                color = _GREEN if floor is None or value >= floor else _RED
                rows.append((f"{p['name']} {which}", value, f"{value:.4f}", color))
    lo = max(-1.0, min(min((r[1] for r in rows), default=1.0) * 1.3 - 0.3, 0.99))
    _bars(ax, "same output? cosine to fp32", rows, empty="no fidelity figures", left=lo,
          right=1.0 + (1.0 - lo) * 0.35)
    if rows:
        ticks = [lo + (1.0 - lo) * i / 3 for i in range(4)]
        ax.set_xticks(ticks, [f"{t:.4g}" for t in ticks], fontsize=8)
        ax.axvline(1.0, color=_GREY, lw=0.8, ls=":")
        if floor is not None and floor >= lo:
            ax.axvline(floor, color=_RED, lw=0.8, ls="--")


def _latency(ax, data: dict[str, Any]) -> None:
    rows = []
    for p in _ran(data):
        lat = p.get("latency") or {}
        ref, q = ((lat.get(k) or {}).get("median_ms") for k in ("reference", "quantized"))
        if ref is not None and q:
            rows.append((f"{p['name']} fp32", ref, f"{ref:.1f} ms", _GREY))
            rows.append((f"{p['name']} quantized", q, f"{q:.1f} ms  ({ref / q:.2f}x)", _GREEN if ref >= q else _RED))
    _bars(ax, "faster? median ms per batch", rows, empty="latency not measured")


def _size(ax, data: dict[str, Any]) -> None:
    models = data.get("models", {})
    ref, q = ((models.get(k, {}).get("size_bytes") or 0) / 1e6 for k in ("reference", "quantized"))
    rows = [("fp32", ref, f"{ref:.1f} MB", _GREY), ("quantized", q, f"{q:.1f} MB  ({ref / q:.1f}x smaller)", _BLUE)]
    _bars(ax, "smaller? MB on disk", rows if ref and q else [], empty="sizes unknown")


def _task(ax, data: dict[str, Any]) -> None:
    rows = []
    for p in _ran(data):
        task = p.get("task") or {}
        if task.get("agreement") is not None:
            delta = task.get("perplexity_delta_pct")
            text = f"{task['agreement']:.3f}" + (f"  (perplexity {delta:+.1f}%)" if delta is not None else "")
            rows.append((f"{p['name']}\n{_metric(task)}", task["agreement"], text, _ORANGE))
    _bars(ax, f"same answers? task {data.get('task')}", rows, empty="no task metric", right=1.6)
    if rows:
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])


def render_png(data: dict[str, Any]) -> bytes:
    """The picture of a validation report, as PNG bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.2), dpi=110)
    grid = fig.add_gridspec(2, 2, left=0.14, right=0.97, top=0.77, bottom=0.07, hspace=0.55, wspace=0.45)
    ok = data.get("ok", True)
    fig.text(0.02, 0.95, headline(data), fontsize=12, weight="bold", color=_GREEN if ok else _RED, va="top")
    problems = list(data.get("violations") or []) + [f"warning: {w}" for w in data.get("warnings") or []]
    subtitle = (
        f"{data.get('data', {}).get('num_samples')} held-out samples, "
        f"{data.get('settings', {}).get('intra_op_num_threads')} threads; "
        f"quantized: {Path(str(data.get('models', {}).get('quantized', {}).get('path', '?'))).parent.name}"
    )
    fig.text(0.02, 0.895, subtitle, fontsize=8.5, color="#424242", va="top")
    if problems:
        first = problems[0] if len(problems[0]) < 150 else problems[0][:147] + "..."
        more = f" (+{len(problems) - 1} more in report.md)" if len(problems) > 1 else ""
        fig.text(0.02, 0.855, first + more, fontsize=8, color=_RED, va="top")
    _fidelity(fig.add_subplot(grid[0, 0]), data)
    _latency(fig.add_subplot(grid[0, 1]), data)
    _size(fig.add_subplot(grid[1, 0]), data)
    _task(fig.add_subplot(grid[1, 1]), data)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
