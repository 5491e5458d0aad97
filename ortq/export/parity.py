"""The export's check: ONNX Runtime against PyTorch on inputs of shapes other than the traced one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ortq.errors import ExportError, ModelError, first_line, require
from ortq.export.spec import ExportSpec
from ortq.runtime import SessionSettings, create_session

logger = logging.getLogger(__name__)


# Max |onnx - torch| / max |torch| above which an export is called broken. Float32 exports land near 1e-6.
PARITY_RTOL = 1e-2


def compare_with_torch(spec: ExportSpec, model_path: Path):
    """Run torch and ORT on the parity inputs; return (max_abs, max_rel, shapes); raise when grossly off."""
    torch = require("torch", "export")

    # Torch first, then ORT: idle ORT worker threads spin and would slow torch down on a small machine.
    all_refs = []
    with torch.no_grad():
        for inputs in spec.parity:
            ref = spec.module(*inputs)
            all_refs.append(
                [r.detach().float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
            )
    try:
        sess = create_session(
            model_path, settings=SessionSettings(threads=min(4, os.cpu_count() or 1)), what="the exported model"
        )
    except ModelError as exc:
        raise ExportError(str(exc)) from exc
    graph_inputs = {i.name for i in sess.get_inputs()}
    max_abs, ref_max, shapes = 0.0, 0.0, []
    for inputs, mask, refs in zip(spec.parity, spec.masks, all_refs, strict=True):
        # The exporter drops inputs the model never reads (DeBERTa's token_type_ids with type_vocab_size=0).
        feeds = {
            n: x.numpy()
            for n, x in zip(spec.input_names, inputs, strict=True)
            if isinstance(x, torch.Tensor) and n in graph_inputs
        }
        try:
            got = sess.run(spec.output_names, feeds)
        except Exception as exc:
            raise ExportError(
                f"ONNX Runtime fails on inputs of shape {_shapes(inputs)}: {first_line(exc)}"
            ) from exc
        for r, g in zip(refs, got, strict=True):
            if r.shape != g.shape:
                raise ExportError(
                    f"ONNX output shape {g.shape} differs from torch {r.shape} on {_shapes(inputs)}"
                )
            diff = np.abs(g.astype(np.float64) - r)
            if mask is not None and r.ndim >= 2 and r.shape[:2] == mask.shape:
                diff, r = diff[mask], r[mask]  # padded positions are don't-care
            elif mask is not None and r.ndim == 4 and (r.shape[0], r.shape[2]) == mask.shape:
                # a KV cache [batch, heads, sequence, head_dim] of a padded prefill
                diff, r = diff.transpose(0, 2, 1, 3)[mask], r.transpose(0, 2, 1, 3)[mask]
            if not np.isfinite(diff).all():
                raise ExportError(f"ONNX output holds NaN/inf where torch does not, on {_shapes(inputs)}")
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            ref_max = max(ref_max, float(np.abs(r).max(initial=0.0)))
        shapes.append(tuple(inputs[0].shape))
    max_rel = max_abs / max(ref_max, 1e-12)
    logger.info("parity vs torch on shapes %s: max abs diff %.3g (relative %.3g)", shapes, max_abs, max_rel)
    if max_rel > PARITY_RTOL:
        raise ExportError(
            f"ONNX output differs from torch by {max_abs:.3g} (max abs; {max_rel:.2%} of the output range); "
            "try exporter='dynamo' or another opset"
        )
    return max_abs, max_rel, tuple(shapes)


def _shapes(inputs) -> str:
    return ", ".join(str(tuple(x.shape)) for x in inputs if hasattr(x, "shape"))
