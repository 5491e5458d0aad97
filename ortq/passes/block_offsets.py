"""Per-block offsets of a carried source grid (a GGUF Q4_1 block minimum that is not a whole number of steps):
``w = (q - zero_point) * scale + offset``, with an offset ``C [N, n_blocks]`` per column and block of K.

``MatMulNBits`` has integer zero points only on its fast CPU path, so the offset term ``sum_b C[n, b] *
S[b]``, ``S = A @ E`` the activation's block sums (``E [K, n_blocks]`` the 0/1 block-membership matrix), is
computed one of two ways:

* folded (the default, :func:`fold_offsets`): the offsets become extra rows of the same ``MatMulNBits``, fed
  the block sums: ``MatMulNBits(Concat(A, A @ E))`` with ``K + n_blocks`` rows. The offsets are stored as
  codes of the layer's own bits, in blocks along the block axis with a scale and zero point per column and
  block (what remains of a Q4_1 minimum after the integer zero point is at most half a step where the block's
  range holds 0; the remainders of a column share a scale, so a weight moves by a fraction of its block's
  step: relative RMS 0.005, at most 0.32 of a step, on SmolLM2-135M's 120 layers). One small MatMul and a
  Concat per activation (shared by the layers reading it) and a kernel 3-5 % larger, with fewer bytes than
  float offsets.
* exact (:func:`add_exact_offsets`): ``MatMulNBits(A) + (A @ E) @ C`` in float, two MatMuls and an Add per
  layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ortq.passes._int4 import BlockQuantized, quantize_rtn
from ortq.passes.initializers import add_initializer, float16_constant


def fold_offsets(bq: BlockQuantized, offsets: np.ndarray, *, float16: bool = False,
                 xtx: np.ndarray | None = None) -> BlockQuantized:
    """``bq [N, K]`` (a carried grid's blocks, K a whole number of blocks) with its ``offsets [N, K / bs]``
    appended as rows ``K .. K + K / bs``, in ``bq``'s bits and block size (asymmetric; scales float16-exact
    with ``float16``): a ``[N, K + K / bs]`` weight whose extra rows multiply the activation's block sums.

    Each block's zero point is chosen again first, to leave the smallest offset (a zero point moves the
    offset by whole steps and leaves the codes as they are): at most half a step where the block's range
    holds 0, so the rounded offsets move a weight by a small fraction of a step. With the activations'
    ``xtx [K, K]`` the rounding weighs each offset by its block sums' mean square."""
    bs, nb = bq.block_size, bq.scales.shape[1]
    bq, residual = recentered(bq, offsets)
    importance = None
    if xtx is not None and xtx.shape == (nb * bs, nb * bs):
        importance = np.array([xtx[i * bs:(i + 1) * bs, i * bs:(i + 1) * bs].sum(dtype=np.float64)
                               for i in range(nb)])
    extra = quantize_rtn(residual, bq.bits, bs, symmetric=False, importance=importance)
    if float16:
        extra = requantize_scales(extra, residual, extra.scales.astype(np.float16).astype(np.float32))
    return BlockQuantized(
        q=np.concatenate([bq.q[:, : nb * bs], extra.q], axis=1),
        scales=np.concatenate([bq.scales, extra.scales], axis=1),
        zero_points=np.concatenate([bq.zero_points, extra.zero_points], axis=1),
        bits=bq.bits, block_size=bs, k=bq.k + nb,
    )


def recentered(bq: BlockQuantized, offsets: np.ndarray) -> tuple[BlockQuantized, np.ndarray]:
    """``bq`` with each block's zero point chosen to leave the smallest offset, and those offsets: the same
    weights (a zero point moves the offset by whole steps and leaves the codes as they are), at most half a
    step of offset where the block's range holds 0. Centred codes also multiply the kernel's int8 rounding of
    the activations by less than codes from 0 to 15 with the whole minimum as the offset: on SmolLM2-135M's
    GGUF carried with exact offsets, +0.35 % / +0.20 % perplexity (in-domain / news) against +1.47 % / +1.75 %."""
    qmax, half = (1 << bq.bits) - 1, 1 << (bq.bits - 1)
    zp = bq.zero_points if bq.zero_points is not None else np.full(bq.scales.shape, half, np.uint8)
    s = bq.scales.astype(np.float64)
    s_safe = np.where(s > 0, s, 1.0)
    z = np.where(s > 0, np.clip(zp - np.rint(offsets / s_safe), 0, qmax), zp)
    residual = (offsets + (z - zp) * s).astype(np.float32)
    return dataclasses.replace(bq, zero_points=z.astype(np.uint8)), residual


def requantize_scales(bq: BlockQuantized, w: np.ndarray, scales: np.ndarray) -> BlockQuantized:
    """``bq`` with new ``scales`` (e.g. rounded to float16) and ``w``'s codes rounded again to them, same zero
    points."""
    rows, k = w.shape
    bs, nb = bq.block_size, scales.shape[1]
    qmax = (1 << bq.bits) - 1
    wp = np.zeros((rows, nb * bs), np.float32)
    wp[:, :k] = w
    zp = bq.zero_points.astype(np.float32)[..., None]
    s = np.where(scales == 0, 1.0, scales)[..., None]
    q = np.clip(np.rint(wp.reshape(rows, nb, bs) / s) + zp, 0, qmax)
    q = np.where((scales == 0)[..., None], zp, q).astype(np.uint8)
    return dataclasses.replace(bq, q=q.reshape(rows, nb * bs), scales=scales.astype(np.float32))


def folded_weight(folded: BlockQuantized, k: int) -> np.ndarray:
    """The ``[N, K]`` weight a folded layer (:func:`fold_offsets`) computes with: its first ``K`` rows
    dequantized plus each block's offset from the extra rows."""
    deq = folded.dequantize()
    return deq[:, :k] + np.repeat(deq[:, k:], folded.block_size, axis=1)[:, :k]


def offset_error(folded: BlockQuantized, w_t: np.ndarray) -> float:
    """Relative RMS error of a folded layer's weight against ``w_t [N, K]``."""
    err = folded_weight(folded, w_t.shape[1]).astype(np.float64) - w_t
    scale = float(np.sqrt(np.mean(np.square(w_t, dtype=np.float64))))
    return float(np.sqrt(np.mean(err * err))) / scale if scale > 0 else 0.0


def block_sum_matrix(graph: ir.Graph, k: int, block_size: int) -> ir.Value:
    """The shared 0/1 initializer ``E [K, K / block_size]``: ``A @ E`` sums ``A``'s blocks."""
    name = f"ortq_block_sum_K{k}_B{block_size}"
    value = graph.initializers.get(name)
    if value is None:
        e = np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
        value = add_initializer(graph, name, e)
    return value


def _block_sums(graph: ir.Graph, a: ir.Value, k: int, block_size: int, made: dict[tuple, ir.Value],
                name: str) -> tuple[ir.Value, list[ir.Node]]:
    """``a @ E``, and the node to insert when it is new (``made`` remembers it per activation)."""
    key = ("sums", a.name, block_size)
    if key in made:
        return made[key], []
    node = ir.node("MatMul", [a, block_sum_matrix(graph, k, block_size)], name=f"{name}_block_sums")
    made[key] = node.outputs[0]
    return made[key], [node]


def with_block_sums(graph: ir.Graph, before: ir.Node, a: ir.Value, k: int, block_size: int,
                    made: dict[tuple, ir.Value], name: str) -> ir.Value:
    """``Concat(a, a @ E)``: the input of a ``MatMulNBits`` with folded offsets, made once per activation
    (``made`` remembers it) and inserted before ``before``."""
    key = ("concat", a.name, block_size)
    if key not in made:
        sums, new = _block_sums(graph, a, k, block_size, made, name)
        cat = ir.node("Concat", [a, sums], {"axis": -1}, name=f"{name}_with_block_sums")
        graph.insert_before(before, [*new, cat])
        made[key] = cat.outputs[0]
    return made[key]


def add_exact_offsets(graph: ir.Graph, node: ir.Node, name: str, weight_name: str, offsets: np.ndarray,
                      k: int, block_size: int, made: dict[tuple, ir.Value], float16: bool) -> ir.Node:
    """``node``'s output plus ``(A @ E) @ C`` in float (``A @ E`` once per activation, remembered in
    ``made``); returns the final ``Add``."""
    sums, new = _block_sums(graph, node.inputs[0], k, block_size, made, name)
    c = np.ascontiguousarray(offsets.T, np.float32)
    c_name = f"{weight_name}_block_offsets"
    c_val = float16_constant(graph, c_name, c) if float16 else add_initializer(graph, c_name, c)
    corr = ir.node("MatMul", [sums, c_val], name=f"{name}_offsets")
    add = ir.node("Add", [node.outputs[0], corr.outputs[0]], name=f"{name}_plus_offsets")
    graph.insert_after(node, [*new, corr, add])
    return add
