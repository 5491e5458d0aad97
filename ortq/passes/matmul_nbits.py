"""Weight-only quantization: ``MatMul`` with a constant weight -> ``com.microsoft.MatMulNBits``, embedding
``Gather`` -> ``com.microsoft.GatherBlockQuantized``.

``MatMulNBits`` (ONNX Runtime contrib op) computes ``A @ dequant(B).T`` for a weight stored transposed,
``[N, K]``, quantized along K in blocks: input B is uint8 ``[N, n_blocks, block_size * bits / 8]``
(4-bit codes two per byte, low nibble first), scales float ``[N, n_blocks]``, optional zero points uint8
``[N, ceil(n_blocks * bits / 8)]`` (absent: ``2**(bits - 1)``), optional bias ``[N]`` (input 5);
attributes ``K``, ``N``, ``bits``, ``block_size`` and ``accuracy_level`` (4: int8 activations, the fast
CPU path).

Algorithms: ``rtn`` (round to nearest with a per-block clipping search and least-squares scale refit; with
calibration data the search weighs each input channel by its mean square activation) and ``gptq`` (needs
calibration data). Layers matched by ``int8_nodes``, and with ``auto_int8_sensitive`` the output projection
(``lm_head``: a MatMul whose result is a graph output, or whose weight is a tied embedding table), use 8 bits.
A tied embedding / ``lm_head`` pair is stored once: the Gather reads the ``MatMulNBits`` codes.

Weights that already lie exactly on a block grid (``keep_source_grid``: a GGUF Q4_0 / Q4_1 / Q8_0 source
loaded by dequantizing it, or a model quantized before) keep that grid instead of being rounded a second
time: a 4-bit grid is kept even where the layer asked for 8 bits. ``MatMulNBits`` has integer zero points
(float ones run a slow dequantizing path on CPU), so a Q4_1 block minimum that is not a whole number of steps
is carried as a per-block offset: by default folded into extra rows of the same ``MatMulNBits`` fed the
activation's block sums, else exactly in float after it (:mod:`ortq.passes.block_offsets`). The report says
per node ``"grid": "carried"`` or ``"requantized"``. With ``sensitive_budget`` every layer is planned in the
base format first, then the most sensitive are upgraded (:mod:`ortq.passes.weight_budget`); with
``float16_scales`` scales and offsets are float16 initializers behind a Cast ONNX Runtime folds at load.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ortq.config import WeightOnlyAlgorithm, WeightOnlyConfig
from ortq.io import unmap
from ortq.passes._int4 import (
    BlockQuantized,
    SourceGrid,
    exact_source_grid,
    pack,
    quantize_gptq,
    quantize_rtn,
    unpack,
)
from ortq.passes.base import ReportingPass
from ortq.passes.block_offsets import (
    add_exact_offsets,
    fold_offsets,
    offset_error,
    recentered,
    with_block_sums,
)
from ortq.passes.gather_quant import MS_DOMAIN, replace_gather, share_gather, swap_output
from ortq.passes.initializers import (
    add_initializer,
    block_initializers,
    drop_unused_initializers,
)
from ortq.passes.weight_budget import (
    Upgrade,
    choose_upgrades,
    int8_bytes,
    relative_errors,
    row_errors,
    stored_bytes,
    to_float16,
)
from ortq.passes.weight_sites import MatMulSite, find_sites, matches, reaches_graph_output, tied_table
from ortq.progress import progress

logger = logging.getLogger(__name__)

def weight_only_activations(model: ir.Model, config: WeightOnlyConfig) -> list[str]:
    """The activations multiplied by the weights :class:`MatMulNBitsPass` would quantize: those whose
    statistics (mean squares, Hessians) the data-aware algorithms read. A weight that will carry its source
    grid (``keep_source_grid`` without a ``sensitive_budget``) needs none."""
    sites, _ = find_sites(model.graph, config, {})
    carry = config.keep_source_grid and not config.sensitive_budget
    return sorted({s.node.inputs[0].name for s in sites if s.node.inputs[0] is not None
                   and not (carry and _source_grid(s, 8, config.block_size) is not None)})


def _source_grid(site: MatMulSite, bits: int, block_size: int) -> SourceGrid | None:
    """:func:`exact_source_grid` of ``site``'s weight, which is unmapped after."""
    grid = exact_source_grid(site.w_t(), bits, block_size)
    site.release()
    return grid


def _carried(grid: SourceGrid | None, site: MatMulSite, offsets: bool) -> SourceGrid | None:
    """``grid`` if ``site`` may carry it: one that needs block offsets only with ``offsets``, and never for a
    table a Gather shares (``GatherBlockQuantized`` has no offsets: the shared table is quantized again)."""
    if grid is not None and grid.offsets is not None and (site.tied_gather or not offsets):
        return None
    return grid


# Weights to quantize (float bytes) above which the plans' packed codes wait in files, not in memory.
SPILL_BYTES = 1 << 30


@dataclass
class _Plan:
    """How one weight is stored: its blocks, the source grid carried (if any) and its report entry.

    The codes are held packed (two 4-bit codes a byte) until the graph is written: every layer's plan is made
    before any is written, and unpacked they would take a byte per weight of the model (1 GiB at 1.1 B
    parameters, beside a GPTQ session's weights and Hessians). ``grid.blocks`` is that packed form too. With
    ``spill`` (a folder: the weights being quantized are large), the packed codes wait in a file there."""

    site: MatMulSite
    packed: BlockQuantized  # q: the codes packed along the last axis (see _int4.pack)
    grid: SourceGrid | None
    entry: dict[str, Any]
    float16: bool = False  # scales (and offsets) stored in float16

    codes_file: Path | None = None  # the packed codes, when spilled (``packed.q`` is then None)
    correction: np.ndarray | None = None  # [N] float32: the mean output error, added as a bias

    @classmethod
    def of(cls, site: MatMulSite, bq: BlockQuantized, grid: SourceGrid | None, entry: dict[str, Any],
           float16: bool, spill: Path | None = None, correction: np.ndarray | None = None) -> _Plan:
        codes, path = pack(bq.q, bq.bits), None
        if spill is not None:
            path = spill / f"{len(list(spill.iterdir()))}.npy"
            np.save(path, codes)
            codes = None
        packed = dataclasses.replace(bq, q=codes)
        return cls(site, packed, dataclasses.replace(grid, blocks=packed) if grid is not None else None, entry,
                   float16, path, correction)

    @property
    def bq(self) -> BlockQuantized:
        p = self.packed
        codes = np.load(self.codes_file) if self.codes_file is not None else p.q
        return dataclasses.replace(p, q=unpack(codes, p.bits, p.n_blocks * p.block_size))


def _plan(site: MatMulSite, config: WeightOnlyConfig, algorithm: WeightOnlyAlgorithm, bits: int,
          hessians: Mapping[str, np.ndarray], mean_squares: Mapping[str, np.ndarray], *, keep_grid: bool,
          offsets: bool = True, spill: Path | None = None,
          centers: Mapping[str, tuple[np.ndarray, int]] | None = None) -> _Plan:
    """Quantize ``site``'s weight at ``bits`` (or carry the source grid it lies on, with ``keep_grid``; one
    that needs block offsets only with ``offsets``)."""
    k, n = site.shape
    bs, sym = _layer_format(config, bits, k)
    w_t = site.w_t()
    act = site.node.inputs[0].name if site.node.inputs[0] is not None else None
    xtx = signal = hessians.get(act)
    tied = bool(site.tied_gather)
    importance = mean_squares.get(act) if not tied else None
    center = (centers or {}).get(act) if config.bias_correction and not tied and _one_use(site) else None
    if center is not None and xtx is not None:  # the mean's share of the error goes to the bias
        xtx = xtx - center[1] * np.outer(center[0], center[0])
    grid = _carried(exact_source_grid(w_t, bits, config.block_size), site, offsets) if keep_grid else None
    if grid is not None:
        bq = grid.blocks
        bs, sym, algo = bq.block_size, bq.zero_points is None, "source-grid"
    elif algorithm == WeightOnlyAlgorithm.GPTQ and xtx is not None and bits == 4:
        # A tied lm_head too (its Gather reads the same codes): SmolLM2 news perplexity +9.2 % vs +15.7 % rtn.
        bq, algo = quantize_gptq(w_t, xtx, bits, bs, sym), "gptq"
    else:
        bq = quantize_rtn(w_t, bits, bs, sym, importance=importance)
        algo = "rtn" + ("+act" if importance is not None else "")
    half = to_float16(bq, grid) if config.float16_scales else None
    if half is not None:
        bq, grid = half
    entry: dict[str, Any] = {
        "node": site.name,
        "op": "MatMulNBits",
        "bits": bq.bits,
        "block_size": bs,
        "symmetric": sym,
        "shape": [k, n],
        "algorithm": algo,
        "grid": "carried" if grid is not None else "requantized",
        **(relative_errors(w_t, bq, xtx, signal_xtx=signal) if grid is None else {"weight_rel_rmse": 0.0}),
    }
    if grid is not None and grid.offsets is not None:
        entry["block_offsets"] = "float16" if half is not None else "float32"
        if config.fold_block_offsets:  # rows of the same MatMulNBits (see ortq.passes.block_offsets)
            bq = fold_offsets(bq, grid.offsets, float16=half is not None, xtx=signal)
            entry["block_offsets"] = f"folded: {bq.bits}-bit rows"
            entry["weight_rel_rmse"] = round(offset_error(bq, w_t), 6)
            grid = SourceGrid(bq, None)
        else:
            bq, offsets = recentered(bq, grid.offsets)
            if half is not None:
                offsets = offsets.astype(np.float16).astype(np.float32)
            grid = SourceGrid(bq, offsets)
    entry["scales"] = "float16" if half is not None else "float32"
    if site.why_bits:
        entry["bits_reason"] = site.why_bits
    correction = None
    if center is not None and grid is None:
        correction = _mean_error(w_t, bq, center[0])
        entry["bias_correction"] = True
    del w_t
    site.release()
    return _Plan.of(site, bq, grid, entry, half is not None, spill, correction)


def _one_use(site: MatMulSite) -> bool:
    """Whether ``site``'s weight has no other consumer (a shared weight's bias would fit one input only)."""
    return len(list(site.weight.uses())) == 1


def _mean_error(w_t: np.ndarray, bq: BlockQuantized, mean: np.ndarray) -> np.ndarray:
    """``(W - dequantized) @ mean`` for ``w_t [N, K]``, by row chunks: the output error at the mean input."""
    out = np.empty(w_t.shape[0], np.float64)
    for rows, d in row_errors(w_t, bq):
        out[rows] = d @ mean
    return out.astype(np.float32)


def _upgrade(plans: dict[tuple, _Plan], config: WeightOnlyConfig, algorithm: WeightOnlyAlgorithm,
             hessians: Mapping[str, np.ndarray], mean_squares: Mapping[str, np.ndarray],
             spill: Path | None = None, centers: Mapping[str, tuple[np.ndarray, int]] | None = None) -> None:
    """Upgrade the most sensitive base-format layers within ``config.sensitive_budget`` (see
    :mod:`ortq.passes.weight_budget`): to the source grid their weight lies on, else to 8 bits."""
    base = {key: p for key, p in plans.items() if p.bq.bits == config.bits and p.grid is None}
    budget = config.sensitive_budget * sum(stored_bytes(p.bq, float16=p.float16) for p in base.values())
    carried: dict[tuple, Upgrade] = {}
    with_offsets: set[tuple] = set()
    eight: dict[tuple, Upgrade] = {}
    for key, p in base.items():
        k, n = p.site.shape
        error = p.entry.get("output_rel_rmse", p.entry["weight_rel_rmse"])
        now = stored_bytes(p.bq, float16=p.float16)
        grid = _carried(_source_grid(p.site, 8, config.block_size), p.site, config.block_offsets)
        if grid is not None:
            size = stored_bytes(grid.blocks, grid, float16=p.float16, folded=config.fold_block_offsets)
            carried[key] = Upgrade(key, error, 0.0, size - now)
            if grid.offsets is not None:
                with_offsets.add(key)
        extra = int8_bytes(n, k, _layer_format(config, 8, k)[0], scale_bytes=2 if p.float16 else 4) - now
        eight[key] = Upgrade(key, error, error / 16, extra)
    # Each carried grid with block offsets costs run time, about the same per layer (two small nodes per
    # activation, see ortq.passes.block_offsets): at most max_offset_layers of them, the largest error
    # removed first; the others are 8-bit candidates.
    allowed = set(with_offsets)
    if config.max_offset_layers is not None:
        ranked = sorted((carried[k] for k in with_offsets), key=lambda c: c.gain, reverse=True)
        allowed = {c.key for c in ranked[:config.max_offset_layers]}
    candidates = [carried[k] if k in carried and (k not in with_offsets or k in allowed) else eight[k] for k in base]
    order = {key: i for i, key in enumerate(plans)}
    # An 8-bit layer is rounded to nearest: its Hessian would only give the report its output error, and
    # Hessians gathered group by group would cost a calibration pass per group again.
    grouped = getattr(hessians, "gathered_by_group", False)
    for key in sorted(choose_upgrades(candidates, budget), key=order.__getitem__):
        old = plans[key]
        plans[key] = new = _plan(old.site, config, algorithm, 8, {} if grouped else hessians, mean_squares,
                                 keep_grid=True, offsets=config.block_offsets and (key not in with_offsets or key in allowed),
                                 spill=spill, centers=centers)
        new.entry["bits_reason"] = (
            f"sensitive: output error {old.entry.get('output_rel_rmse', old.entry['weight_rel_rmse']):.4f} "
            f"at {config.bits} bits"
        )


def _layer_format(config: WeightOnlyConfig, bits: int, k: int) -> tuple[int, bool]:
    """(block size, symmetric) of a layer: 8-bit layers are symmetric with a larger block when K allows."""
    if bits == config.bits:
        return config.block_size, config.symmetric
    if config.int8_block_size is not None:
        return config.int8_block_size, True
    for b in (128, 64, 32, 16):
        if b >= config.block_size and k % b == 0:
            return b, True
    return config.block_size, True


def _ensure_opset(model: ir.Model) -> None:
    if model.opset_imports.get(MS_DOMAIN) is None:
        model.opset_imports[MS_DOMAIN] = 1
    if model.graph.opset_imports.get(MS_DOMAIN) is None:
        model.graph.opset_imports[MS_DOMAIN] = 1


def quantize_weight_only(
    model: ir.Model,
    config: WeightOnlyConfig,
    *,
    mean_squares: Mapping[str, np.ndarray] | None = None,
    hessians: Mapping[str, np.ndarray] | None = None,
    calibration: dict[str, Any] | None = None,
    means: Mapping[str, np.ndarray] | None = None,
    counts: Mapping[str, int] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Quantize the constant weights of ``MatMul`` (and embedding ``Gather``) nodes in place.

    Args:
        model: the float model (edited in place and returned).
        config: bits, block size, symmetry, accuracy level, algorithm and overrides.
        mean_squares: per-channel mean ``x^2`` of each :func:`weight_only_activations` activation, from the
            calibration data (with ``rtn`` they weight the clipping search by activation energy).
        hessians: ``X^T X`` of those activations (required by ``gptq``).
        calibration: what the statistics came from (tokens, activations, seconds), for the report.
        means, counts: per-channel means of those activations and their row counts (``bias_correction``).

    Returns:
        The model and a JSON-able report: per quantized node its bits, block size, shape, algorithm and
        error; the nodes left in float with the reason; bytes of the weights before and after.
    """
    t0 = time.perf_counter()
    graph = model.graph
    algorithm = WeightOnlyAlgorithm(config.algorithm)
    notes = []
    if algorithm == WeightOnlyAlgorithm.GPTQ and hessians is None:
        # GPTQ is the default: without statistics (no calibration data) every layer is rounded with rtn.
        notes.append("gptq without calibration statistics: rtn used")
        logger.warning("weight-only: %s", notes[-1])
        algorithm = WeightOnlyAlgorithm.RTN

    skipped: dict[str, str] = {}
    sites, gathers = find_sites(graph, config, skipped)

    # Tied embeddings: a Gather table equal to the transposed lm_head weight is stored once.
    tied_tables: set[int] = set()
    for site in sites:
        k, n = site.shape
        for gnode in gathers:
            if id(gnode) in tied_tables:  # a weight shared by several MatMuls ties its table once
                continue
            if tuple(gnode.inputs[0].const_value.shape.numpy()) == (n, k) and tied_table(gnode.inputs[0], site):
                site.tied_gather.append(gnode)
                tied_tables.add(id(gnode))
    gathers = [g for g in gathers if id(g) not in tied_tables]

    # Bits per layer.
    for site in sites:
        site.bits = config.bits
        if matches(site.name, config.int8_nodes):
            site.bits, site.why_bits = 8, "int8_nodes"
        elif config.auto_int8_sensitive and config.bits < 8:
            if site.tied_gather:
                site.bits, site.why_bits = 8, "auto: lm_head tied to the embedding table"
            elif reaches_graph_output(site.node.outputs[0]):
                site.bits, site.why_bits = 8, "auto: output projection (lm_head)"

    mean_squares = mean_squares or {}
    hessians = hessians or {}
    centers = {a: (np.asarray(m, np.float64), int((counts or {}).get(a, 0))) for a, m in (means or {}).items()}
    _ensure_opset(model)
    # 1. Every layer in its format (one plan per distinct weight and format: a shared weight is stored once).
    plans: dict[tuple, _Plan] = {}
    keys: list[tuple] = []
    spill_dir = (tempfile.TemporaryDirectory(prefix="ortq-codes-", ignore_cleanup_errors=True)
                 if sum(site.nbytes for site in sites) > SPILL_BYTES else None)
    spill = Path(spill_dir.name) if spill_dir is not None else None
    for site in progress(sites, desc="weight-only", unit="layer"):
        k, n = site.shape
        bs, sym = _layer_format(config, site.bits, k)
        key = (id(site.weight), site.bits, bs, sym) + ((id(site),) if site.tied_gather else ())
        keys.append(key)
        if key not in plans:
            plans[key] = _plan(site, config, algorithm, site.bits, hessians, mean_squares,
                               keep_grid=config.keep_source_grid, spill=spill, centers=centers)
    # 2. The most sensitive layers upgraded within the byte budget.
    if config.sensitive_budget and config.bits < 8:
        _upgrade(plans, config, algorithm, hessians, mean_squares, spill, centers)

    # 3. The graph. A plan's codes are dropped once its last site is replaced: they are in the initializers.
    block_sums: dict[tuple, ir.Value] = {}
    nodes_report: list[dict[str, Any]] = []
    bytes_before = bytes_after = 0
    made: dict[tuple, tuple] = {}  # plan key -> its initializers
    made_gathers: dict[int, ir.Node] = {}  # table -> its GatherBlockQuantized: a shared table is stored once
    left = Counter(keys)
    for site, key in zip(sites, keys):
        plan = plans[key]
        left[key] -= 1
        if not left[key]:
            del plans[key]
        bq, grid, entry = plan.bq, plan.grid, plan.entry
        k, n = site.shape
        if key in made:
            _replace_matmul(graph, site, bq, config, values=made[key], grid=grid, block_sums=block_sums,
                            float16=plan.float16)
            entry.setdefault("shared_with", []).append(site.name)
            continue
        before = site.nbytes + (site.bias.nbytes if site.bias is not None else 0)
        for g in site.tied_gather:
            before += 0 if g.inputs[0] is site.weight else site.nbytes
        after = stored_bytes(bq, grid, float16=plan.float16) + (site.bias.nbytes if site.bias is not None else 0)
        b_val, s_val, z_val = _replace_matmul(graph, site, bq, config, grid=grid, block_sums=block_sums,
                                              float16=plan.float16, correction=plan.correction)
        made[key] = (b_val, s_val, z_val)
        for g in site.tied_gather:
            old_table = g.inputs[0]
            if id(old_table) in made_gathers:
                share_gather(graph, g, made_gathers[id(old_table)])
                drop_unused_initializers(graph, [old_table])
                entry.setdefault("tied_gathers", []).append(g.name)
                continue
            shared = (b_val, s_val, z_val) if k % bq.block_size == 0 else None
            made_gathers[id(old_table)] = replace_gather(graph, g, bq, shared=shared)
            if shared is None:
                after += stored_bytes(bq)
            drop_unused_initializers(graph, [old_table])
            entry.setdefault("tied_gathers", []).append(g.name)
        entry["bytes_before"], entry["bytes_after"] = before, after
        bytes_before += before
        bytes_after += after
        nodes_report.append(entry)
        del plan, bq, grid

    for gnode in gathers:
        if id(gnode.inputs[0]) in made_gathers:
            old_table = gnode.inputs[0]
            share_gather(graph, gnode, made_gathers[id(old_table)])
            drop_unused_initializers(graph, [old_table])
            continue
        bits = 8 if matches(gnode.name or "", config.int8_nodes) else config.bits
        old_table = gnode.inputs[0]
        shape = tuple(old_table.const_value.shape.numpy())
        if bits == 4 and shape[1] % 2:
            skipped[gnode.name] = "odd embedding width"
            continue
        bs, sym = _layer_format(config, bits, shape[1])
        table = old_table.const_value.numpy()
        bq = quantize_rtn(table, bits, bs, sym)
        errors = relative_errors(table, bq, None)
        del table
        unmap([old_table])
        name = gnode.name
        before = shape[0] * shape[1] * 4
        made_gathers[id(old_table)] = replace_gather(graph, gnode, bq)
        drop_unused_initializers(graph, [old_table])
        after = bq.k * bq.q.shape[0] * bits // 8 + bq.scales.nbytes
        zp = bq.packed_zero_points()
        after += zp.nbytes if zp is not None else 0
        bytes_before += before
        bytes_after += after
        nodes_report.append(
            {
                "node": name,
                "op": "GatherBlockQuantized",
                "bits": bits,
                "block_size": bs,
                "symmetric": sym,
                "shape": list(shape),
                "algorithm": "rtn",
                **errors,
                "bytes_before": before,
                "bytes_after": after,
            }
        )

    carried = [e["node"] for e in nodes_report if e.get("grid") == "carried"]
    report = {
        "config": config.to_dict(),
        "nodes": nodes_report,
        "source_grid": {"carried": carried,
                        "requantized": [e["node"] for e in nodes_report if e.get("grid") != "carried"]},
        "float_nodes": skipped,
        "num_quantized": len(nodes_report),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "calibration": calibration,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    logger.info(
        "weight-only: %d nodes quantized, %d left in float, weights %.1f MB -> %.1f MB",
        len(nodes_report),
        len(skipped),
        bytes_before / 1e6,
        bytes_after / 1e6,
    )
    if spill_dir is not None:
        spill_dir.cleanup()
    return model, report


def _replace_matmul(graph: ir.Graph, site: MatMulSite, bq: BlockQuantized, config: WeightOnlyConfig,
                    values: tuple | None = None, grid: SourceGrid | None = None, block_sums: dict | None = None,
                    float16: bool = False, correction: np.ndarray | None = None):
    """Replace ``site`` by MatMulNBits on new initializers, or on ``values`` (those of a weight shared with a
    site replaced before); a carried source grid with offsets adds them after the op."""
    node = site.node
    k, n = site.shape
    base = site.weight.name or site.name
    if values is not None:
        b_val, s_val, z_val = values
    else:
        b_val, s_val, z_val = block_initializers(
            graph, base, bq.packed_codes(), bq.scales, bq.packed_zero_points(), bq.bits, float16_scales=float16
        )
    block_sums = {} if block_sums is None else block_sums
    a = node.inputs[0]
    if bq.k > k:  # block offsets folded in: the activation gets its block sums appended
        a = with_block_sums(graph, node, a, k, bq.block_size, block_sums, site.name)
    inputs: list[ir.Value | None] = [a, b_val, s_val, z_val]
    old_bias = None
    if node.op_type == "Gemm" and site.bias is not None:
        inputs += [None, node.inputs[2]]
    elif site.bias_add is not None:
        old_bias = (
            site.bias_add.inputs[0] if site.bias_add.inputs[1] is node.outputs[0] else site.bias_add.inputs[1]
        )
        inputs += [None, old_bias]
    replaced_bias = None
    if correction is not None:
        bias = inputs[5] if len(inputs) > 5 else None
        if bias is None or bias.const_value is not None:
            total = correction if bias is None else bias.const_value.numpy().astype(np.float32) + correction
            inputs[4:] = [None, add_initializer(graph, f"{base}_bias_corrected", total.astype(np.float32))]
            replaced_bias = bias
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs: dict[str, Any] = {"K": bq.k, "N": n, "bits": bq.bits, "block_size": bq.block_size}
    if config.accuracy_level is not None:
        attrs["accuracy_level"] = config.accuracy_level
    new = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=site.name + "_Q" + str(bq.bits))
    old_weight = site.weight
    anchor = site.bias_add if site.bias_add is not None else node
    graph.insert_before(anchor, new)
    last = new
    if grid is not None and grid.offsets is not None:
        last = add_exact_offsets(graph, new, site.name, base, grid.offsets, k, grid.blocks.block_size,
                                 block_sums, float16)
    swap_output(graph, anchor, last)
    if site.bias_add is not None:
        graph.remove(node, safe=True)
    drop_unused_initializers(graph, [old_weight] + ([replaced_bias] if replaced_bias is not None else []))
    unmap([old_weight])
    return b_val, s_val, z_val


class MatMulNBitsPass(ReportingPass):
    """Weight-only quantization (:func:`quantize_weight_only`) as a pass; its report is the pass report.

    Args:
        config: the weight-only config.
        mean_squares, hessians, calibration: activation statistics from the calibration step (see
            :func:`quantize_weight_only`); None without calibration data.
    """

    report_key = "weight_only"

    def __init__(
        self,
        config: WeightOnlyConfig,
        *,
        mean_squares: Mapping[str, np.ndarray] | None = None,
        hessians: Mapping[str, np.ndarray] | None = None,
        calibration: dict[str, Any] | None = None,
        means: Mapping[str, np.ndarray] | None = None,
        counts: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.config = config
        self.means, self.counts = means, counts
        self.mean_squares = mean_squares
        self.hessians = hessians
        self.calibration = calibration

    def rewrite(self, model: ir.Model) -> bool:
        _, self.report = quantize_weight_only(
            model, self.config, mean_squares=self.mean_squares, hessians=self.hessians, calibration=self.calibration,
            means=self.means, counts=self.counts,
        )
        return self.report["num_quantized"] > 0
