"""The accuracy-budget simulator: every quantized node of a plan switchable between int8 and float in one
session, so that the search of :mod:`ortq.fallback` tries subsets of nodes without building models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ortq.passes.grid import dequantized_weight
from ortq.passes.initializers import insert_after_producer, values_by_name
from ortq.passes.plan import QuantPlan, ensure_node_names
from ortq.runtime import SessionSettings, attention_mask_of, create_session
from ortq.validate import sample_cosines

SELECT_INPUT = "__ortq_int8_select"


class Simulator:
    """The fp32 model with every quantized input of every planned node routed through a switch:
    ``x + select[i] * (DQ(Q(x)) - x)``, ``select`` a graph input with one entry per node (1: int8, 0: float).
    Any subset of nodes kept in float is then one run of one session, with no model to rebuild. The int8
    kernels compute the same products exactly in int32, so this simulates them up to float rounding."""

    def __init__(self, fp32: ir.Model, plan: QuantPlan, batches: Sequence[Mapping[str, np.ndarray]],
                 reference_outputs: list[dict[str, np.ndarray]], outputs: list[str], threads: int):
        self.nodes = list(plan.quantized_nodes)
        self.batches = batches
        self.reference_outputs = reference_outputs
        self.outputs = outputs
        model = fp32.clone()
        graph = model.graph
        ensure_node_names(graph)
        select = ir.val(SELECT_INPUT, ir.DataType.FLOAT, ir.Shape([len(self.nodes)]))
        graph.inputs.append(select)
        values = values_by_name(graph)
        simulated: dict[str, ir.Value] = {}
        for name, qp in plan.activations.items():
            x = values[name]
            scale = ir.val(f"{name}__sim_scale", const_value=ir.tensor(qp.scale, name=f"{name}__sim_scale"))
            zp = ir.val(f"{name}__sim_zp", const_value=ir.tensor(qp.zero_point, name=f"{name}__sim_zp"))
            for c in (scale, zp):
                graph.register_initializer(c)
            q = ir.node("QuantizeLinear", [x, scale, zp], name=f"{name}__sim_q")
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{name}__sim_dq")
            insert_after_producer(graph, x, [q, dq])
            simulated[name] = dq.outputs[0]
        for name, qp in plan.weights.items():
            w = values[name]
            deq = dequantized_weight(w.const_value.numpy(), qp)
            c = ir.val(f"{name}__sim_w", const_value=ir.tensor(deq, name=f"{name}__sim_w"))
            graph.register_initializer(c)
            simulated[name] = c
        by_name = {n.name: n for n in graph}
        for i, node_name in enumerate(self.nodes):
            node = by_name[node_name]
            index = ir.val(f"__ortq_sim_index_{i}", const_value=ir.tensor(np.array(i, np.int64), name=f"__ortq_sim_index_{i}"))
            graph.register_initializer(index)
            gate = ir.node("Gather", [select, index], name=f"{node_name}__sim_gate")
            new_nodes = [gate]
            for j in plan.node_inputs.get(node_name, ()):
                x = node.inputs[j]
                if x is None or x.name not in simulated:
                    continue
                diff = ir.node("Sub", [simulated[x.name], x], name=f"{node_name}__sim_sub{j}")
                scaled = ir.node("Mul", [diff.outputs[0], gate.outputs[0]], name=f"{node_name}__sim_mul{j}")
                mixed = ir.node("Add", [x, scaled.outputs[0]], name=f"{node_name}__sim_add{j}")
                new_nodes += [diff, scaled, mixed]
                node.replace_input_with(j, mixed.outputs[0])
            graph.insert_before(node, new_nodes)
        self.session = create_session(model, settings=SessionSettings(threads=threads), what="the fallback simulator")
        self.evaluations = 0

    def quick_batches(self, num_samples: int) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """The first ``num_samples`` samples (feeds with their reference outputs), for cheap probes."""
        out, left = [], num_samples
        for feed, ref in zip(self.batches, self.reference_outputs, strict=False):
            if left <= 0:
                break
            n = min(left, int(np.shape(next(iter(feed.values())))[0]))
            out.append(_trim_padding({k: v[:n] for k, v in feed.items()}, {k: v[:n] for k, v in ref.items()}))
            left -= n
        return out

    def drop(self, kept_float: Sequence[str], pairs: Sequence[tuple[Mapping, Mapping]] | None = None) -> float:
        """Cosine drop (``1 -`` the worst output's mean per-sample cosine) with ``kept_float`` in float, on all
        batches or on the given (feed, reference outputs) pairs."""
        self.evaluations += 1
        select = np.ones(len(self.nodes), np.float32)
        kept = set(kept_float)
        select[[i for i, n in enumerate(self.nodes) if n in kept]] = 0.0
        per_output: dict[str, list[float]] = {o: [] for o in self.outputs}
        if pairs is None:
            pairs = list(zip(self.batches, self.reference_outputs, strict=False))
        for feed, ref in pairs:
            f = {i.name: feed[i.name] for i in self.session.get_inputs() if i.name != SELECT_INPUT}
            got = dict(zip(self.outputs, self.session.run(self.outputs, {**f, SELECT_INPUT: select}), strict=True))
            mask = attention_mask_of(feed)
            for o in self.outputs:
                per_output[o].extend(sample_cosines(ref[o], got[o], mask))
        worst = min((float(np.mean(c)) for c in per_output.values() if c), default=1.0)
        return max(0.0, 1.0 - worst)


def _trim_padding(
    feed: dict[str, np.ndarray], ref: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Drop trailing sequence positions that are padding in every row (right-padded text batches), from the
    feed and the reference outputs laid out ``[batch, seq, ...]``; other batches are returned unchanged."""
    mask = attention_mask_of(feed)
    if mask is None or not mask.any():
        return feed, ref
    seq = mask.shape[1]
    length = int(np.flatnonzero(mask.any(axis=0)).max()) + 1
    if length == seq:
        return feed, ref
    if any(np.ndim(v) != 2 or np.shape(v) != mask.shape for v in feed.values()):
        return feed, ref
    if any(np.ndim(v) < 2 or np.shape(v)[:2] != mask.shape for v in ref.values()):
        return feed, ref
    return {k: v[:, :length] for k, v in feed.items()}, {k: v[:, :length] for k, v in ref.items()}
