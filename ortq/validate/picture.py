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


def _label_bars(ax, bars, texts) -> None:
    for bar, text in zip(bars, texts, strict=True):
        ax.text(bar.get_x() + bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}",
                va="center", ha="left", fontsize=8)


def _fidelity(ax, data: dict[str, Any]) -> None:
    ran = _ran(data)
    rows, labels = [], []
    for p in ran:
        fid = p.get("fidelity") or {}
        if fid.get("cosine") is None:
            continue
        rows += [fid["cosine"], fid.get("cosine_min", fid["cosine"])]
        labels += [f"{p['name']} mean", f"{p['name']} worst"]
    ax.set_title("same output? cosine to fp32", fontsize=9, loc="left")
    if not rows:
        ax.text(0.5, 0.5, "no fidelity figures", ha="center", va="center", transform=ax.transAxes, color=_GREY)
        ax.set_axis_off()
        return
    floor = (data.get("thresholds") or {}).get("cosine_floor")
    lo = min(min(rows) - (1 - min(rows)) * 0.3, 0.99)
    lo = max(lo, -1.0)
    colors = [_GREEN if (floor is None or v >= floor) else _RED for v in rows]
    bars = ax.barh(range(len(rows)), [v - lo for v in rows], left=lo, color=colors, height=0.6)
    _label_bars(ax, bars, [f"{v:.4f}" for v in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(lo, 1.0 + (1.0 - lo) * 0.35)
    ticks = [lo + (1.0 - lo) * i / 3 for i in range(4)]
    ax.set_xticks(ticks, [f"{t:.4g}" for t in ticks], fontsize=8)
    ax.axvline(1.0, color=_GREY, lw=0.8, ls=":")
    if floor is not None and floor >= lo:
        ax.axvline(floor, color=_RED, lw=0.8, ls="--")


def _latency(ax, data: dict[str, Any]) -> None:
    ax.set_title("faster? median ms per batch", fontsize=9, loc="left")
    rows, labels, colors, texts = [], [], [], []
    for p in _ran(data):
        lat = p.get("latency") or {}
        ref, q = ((lat.get(k) or {}).get("median_ms") for k in ("reference", "quantized"))
        if ref is None or q is None:
            continue
        speedup = ref / q if q else float("nan")
        rows += [ref, q]
        labels += [f"{p['name']} fp32", f"{p['name']} quantized"]
        colors += [_GREY, _GREEN if speedup >= 1 else _RED]
        texts += [f"{ref:.1f} ms", f"{q:.1f} ms  ({speedup:.2f}x)"]
    if not rows:
        ax.text(0.5, 0.5, "latency not measured", ha="center", va="center", transform=ax.transAxes, color=_GREY)
        ax.set_axis_off()
        return
    bars = ax.barh(range(len(rows)), rows, color=colors, height=0.6)
    _label_bars(ax, bars, texts)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(rows) * 1.6)


def _size(ax, data: dict[str, Any]) -> None:
    ax.set_title("smaller? MB on disk", fontsize=9, loc="left")
    models = data.get("models", {})
    sizes = [(models.get(k, {}).get("size_bytes") or 0) / 1e6 for k in ("reference", "quantized")]
    if not all(sizes):
        ax.set_axis_off()
        return
    bars = ax.barh([0, 1], sizes, color=[_GREY, _BLUE], height=0.6)
    _label_bars(ax, bars, [f"{sizes[0]:.1f} MB", f"{sizes[1]:.1f} MB  ({sizes[0] / sizes[1]:.1f}x smaller)"])
    ax.set_yticks([0, 1], ["fp32", "quantized"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(sizes) * 1.8)


def _task(ax, data: dict[str, Any]) -> None:
    ax.set_title(f"same answers? task {data.get('task')}", fontsize=9, loc="left")
    rows, labels, texts = [], [], []
    for p in _ran(data):
        task = p.get("task") or {}
        if task.get("agreement") is not None:
            rows.append(task["agreement"])
            labels.append(f"{p['name']}\n{_metric(task)}")
            extra = task.get("perplexity_delta_pct")
            texts.append(f"{task['agreement']:.3f}" + (f"  (perplexity {extra:+.1f}%)" if extra is not None else ""))
    if not rows:
        ax.text(0.5, 0.5, "no task metric", ha="center", va="center", transform=ax.transAxes, color=_GREY)
        ax.set_axis_off()
        return
    bars = ax.barh(range(len(rows)), rows, color=_ORANGE, height=0.6)
    _label_bars(ax, bars, texts)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.6)
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
