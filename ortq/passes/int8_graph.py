"""Which activations stay 8-bit between integer kernels: the structure behind convolution int8 on the CPU EP.

ONNX Runtime's CPU EP runs a convolution in int8 only as ``QLinearConv``, which its QDQ selectors build from
``DQ(x), DQ(w), DQ(int32 bias) -> Conv -> Q``: the convolution's output must be quantized too, and the Conv
must feed nothing but that QuantizeLinear. A ``Relu`` or ``Clip`` between the Conv and the QuantizeLinear is
dropped when the QuantizeLinear's range already clips to it (a zero point at the bottom of the integer range
for Relu; a representable range inside ``[min, max]`` for Clip), so quantizing the activation's output folds
it into the kernel. Around the convolutions:

* ops with QLinear kernels (``QLinearAdd``, ``QLinearMul``, ``QLinearConcat``, ``QLinearGlobalAveragePool``,
  ``QLinearAveragePool``, ``QLinearSigmoid``, ``QLinearLeakyRelu``) need all data inputs and their output
  quantized; their output gets its own calibrated range;
* data-movement ops (``MaxPool``, ``Flatten``, ``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Transpose``,
  ``Resize``) run on uint8/int8 when their input and output QuantizeLinear share one scale and zero point
  (ONNX Runtime drops the pair), so their output reuses the input's parameters.

``Add`` and ``Mul`` may also take a scalar constant (quantized like a weight, on the activations' type); a
``Mul`` by a positive scalar constant runs no kernel at all: its output is its input's integers read with the
scale multiplied (a second DequantizeLinear), which is how a decomposed Hardswish / Hardsigmoid
(:mod:`ortq.passes.convnet_rewrites`) divides by 6 for free.

Such an op is planned in int8 only when every data input is already an 8-bit tensor of the plan: the chain
starts at quantized convolutions and never reaches a transformer's float residual stream. This module finds
the structure; :mod:`ortq.passes.plan` attaches the ranges.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Op type -> indices of its data inputs (None: all inputs). Outputs get their own calibrated range.
QLINEAR_OPS: dict[str, tuple[int, ...] | None] = {
    "Add": (0, 1),
    "Mul": (0, 1),
    "Concat": None,
    "GlobalAveragePool": (0,),
    "AveragePool": (0,),
    "Sigmoid": (0,),
    "LeakyRelu": (0,),
}
# Op type -> data inputs; the output shares the input's scale and zero point.
SAME_SCALE_OPS: dict[str, tuple[int, ...]] = {
    "MaxPool": (0,),
    "Flatten": (0,),
    "Reshape": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Transpose": (0,),
    "Resize": (0,),
}
# Compute ops whose output is quantized (with a following Relu/Clip folded in).
OUTPUT_QUANTIZED_OPS = frozenset({"Conv"})
FOLDABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Chain ops that accept a scalar constant as one data input.
CONSTANT_INPUT_OPS = frozenset({"Add", "Mul"})

__all__ = [
    "CONSTANT_INPUT_OPS",
    "FOLDABLE_ACTIVATIONS",
    "OUTPUT_QUANTIZED_OPS",
    "QLINEAR_OPS",
    "SAME_SCALE_OPS",
    "chain_inputs",
    "clip_bounds",
    "folded_activation",
    "is_chain_op",
    "scalar_constant",
]


def is_chain_op(node: ir.Node) -> bool:
    """Whether ``node`` can stay 8-bit between integer kernels (a QLinear or data-movement op)."""
    return node.domain in ("", "ai.onnx") and (node.op_type in QLINEAR_OPS or node.op_type in SAME_SCALE_OPS)


def chain_inputs(node: ir.Node) -> list[int]:
    """Indices of the data inputs of a chain op (the ones that must be 8-bit)."""
    indices = QLINEAR_OPS.get(node.op_type) if node.op_type in QLINEAR_OPS else SAME_SCALE_OPS[node.op_type]
    if indices is None:
        indices = tuple(range(len(node.inputs)))
    return [i for i in indices if i < len(node.inputs) and node.inputs[i] is not None]


def scalar_constant(node: ir.Node, index: int) -> float | None:
    """The finite value of input ``index`` of an Add / Mul when it is a one-element constant, else None."""
    if node.op_type not in CONSTANT_INPUT_OPS or index >= len(node.inputs) or node.inputs[index] is None:
        return None
    const = node.inputs[index].const_value
    if const is None:
        return None
    a = const.numpy()
    if a.size != 1 or not np.isfinite(a).all():
        return None
    return float(a.reshape(()))


def _sole_consumer(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """The constant ``(min, max)`` of a Clip (inputs since opset 11, attributes before); None if not
    constant. Relu is ``(0, inf)``."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    bounds = [float("-inf"), float("inf")]
    for k, attr_name in ((0, "min"), (1, "max")):
        attr = node.attributes.get(attr_name)
        if attr is not None:
            bounds[k] = float(attr.as_float())
        v = node.inputs[k + 1] if len(node.inputs) > k + 1 else None
        if v is None:
            continue
        if v.const_value is None or v.const_value.numpy().size != 1:
            return None
        bounds[k] = float(v.const_value.numpy().reshape(()))
    return bounds[0], bounds[1]


def folded_activation(node: ir.Node) -> ir.Node | None:
    """The Relu / Clip (constant bounds) that is the sole consumer of ``node``'s output and may fold into its
    output QuantizeLinear, or None."""
    consumer = _sole_consumer(node.outputs[0])
    if consumer is None or consumer.op_type not in FOLDABLE_ACTIVATIONS or consumer.domain not in ("", "ai.onnx"):
        return None
    if clip_bounds(consumer) is None or consumer.outputs[0].is_graph_output():
        return None
    return consumer
