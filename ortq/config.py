"""Configuration objects: frozen dataclasses, validated on construction, round-tripped through JSON.

Each quantization method is a config type (:class:`QuantizationConfig` for static QDQ int8,
:class:`WeightOnlyConfig` for int4/int8 weight-only ``MatMulNBits``); the quantizer dispatches on the type.
:class:`AutoQuantizationConfig` and :class:`AutoCalibrationConfig` keep Optimum's names.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ortq.errors import ConfigError


class QuantType(str, enum.Enum):
    """Integer type of a quantized tensor."""

    QInt8 = "int8"
    QUInt8 = "uint8"

    @property
    def qrange(self) -> tuple[int, int]:
        return (-128, 127) if self is QuantType.QInt8 else (0, 255)


class CalibrationMethod(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel. ``axis`` is resolved per op when None (MatMul: 1, Gemm: 0 or 1, Conv: 0)."""

    axis: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_channel", "axis": self.axis}


Granularity = PerTensor | PerChannel


def _granularity_from_dict(d: dict[str, Any]) -> Granularity:
    kind = d.get("type")
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerChannel(d.get("axis"))
    raise ConfigError(f"unknown granularity {d!r}; expected per_tensor or per_channel")


def _enum(cls: type[enum.Enum], value: Any, what: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"invalid {what} {value!r}; choose one of: {choices}") from None


def _check_keys(cls: type, data: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"kind"})
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")


class _JsonConfig:
    """``to_dict`` / ``from_dict`` for a frozen config dataclass: enums as their values, tuples as lists,
    granularities as their dicts, and ``kind`` naming the config type (``KIND``; none for calibration)."""

    KIND: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, (PerTensor, PerChannel)):
                value = value.to_dict()
            d[f.name] = value
        if self.KIND is not None:
            d["kind"] = self.KIND
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _check_keys(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "kind"})


@dataclass(frozen=True)
class CalibrationConfig(_JsonConfig):
    """How activation ranges are estimated.

    Attributes:
        method: minmax, percentile or entropy (KL divergence).
        num_samples: at most this many calibration samples are used (None: all).
        batch_size: samples per ONNX Runtime run while collecting statistics.
        moving_average: minmax only; exponential moving average of per-batch min/max.
        averaging_constant: weight of the newest batch in the moving average (0 < c <= 1).
        percentile: percentile only; the kept share of |x| mass, in percent (0 < p <= 100).
        num_bins: histogram bins (percentile, entropy).
        num_quantized_bins: entropy only; bins of the quantized distribution (e.g. 128 for int8 symmetric).
        symmetric: entropy/percentile: search a symmetric range [-t, t] rather than [lo, hi].
        exclude_padding: positions masked out by ``attention_mask`` do not enter the statistics.
    """

    method: CalibrationMethod = CalibrationMethod.MINMAX
    num_samples: int | None = None
    batch_size: int = 16
    moving_average: bool = False
    averaging_constant: float = 0.01
    percentile: float = 99.999
    num_bins: int = 2048
    num_quantized_bins: int = 128
    symmetric: bool = False
    exclude_padding: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _enum(CalibrationMethod, self.method, "calibration method"))
        if self.num_samples is not None and (not isinstance(self.num_samples, int) or self.num_samples < 1):
            raise ConfigError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0.0 < float(self.averaging_constant) <= 1.0:
            raise ConfigError(f"averaging_constant must be in (0, 1], got {self.averaging_constant!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if not isinstance(self.num_bins, int) or self.num_bins < 16:
            raise ConfigError(f"num_bins must be an integer >= 16, got {self.num_bins!r}")
        if not isinstance(self.num_quantized_bins, int) or not 2 <= self.num_quantized_bins <= self.num_bins:
            raise ConfigError(
                f"num_quantized_bins must be an integer in [2, num_bins={self.num_bins}], "
                f"got {self.num_quantized_bins!r}"
            )



DEFAULT_OPERATORS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class QuantizationConfig(_JsonConfig):
    """Static (calibrated) int8 quantization with QDQ nodes.

    Attributes:
        activations_dtype: uint8 (asymmetric, the CPU EP's fast path) or int8.
        activations_symmetric: symmetric activation ranges (zero point 0).
        weights_dtype: int8 or uint8.
        weights_symmetric: symmetric weights (zero point 0); required by most int8 kernels.
        weights_granularity: :class:`PerTensor` or :class:`PerChannel`.
        reduce_range: 7-bit weights, avoiding the u8s8 saturation of AVX2 / AVX512 without VNNI.
        operators_to_quantize: op types whose inputs get QDQ pairs.
        nodes_to_exclude: node names (or fnmatch patterns) kept in float.
        quantize_activation_matmuls: also quantize MatMuls whose both inputs are activations (attention
            scores and context). Off for CPU presets: at transformer sizes the two extra QuantizeLinear cost
            more than the int8 kernel saves, and they carry most of the error.
        int8_chain: keep the ops between int8 convolutions 8-bit: quantized convolution outputs (Relu/Clip
            folded), Add / Mul / Concat / pooling / Sigmoid as QLinear kernels, and reshapes / max pooling
            on the input's scale (see :mod:`ortq.passes.int8_graph`). Off: only inputs are quantized.
        quantize_embeddings: large embedding Gathers become 8-bit ``GatherBlockQuantized`` (CPU presets).
        weight_storage_bits: 8, or 4 to store MatMul weights as 4-bit blocks that ONNX Runtime unpacks to int8
            at load (W4A8: int4 size, int8 kernels; see :mod:`ortq.passes.int4_storage`).
        storage_block_size: weights per scale of the 4-bit storage.
        tune_cpu_kernels: keep ONNX Runtime's CPU EP off fused kernels that measure slower on this machine
            than the ops they replace (see :mod:`ortq.passes.cpu_kernels`; CPU presets).
        smooth_quant_alpha: SmoothQuant migration strength in [0, 1] for MatMuls with constant weights,
            ``"auto"`` to search it per activation on calibration rows (the presets' default), None: off.
        narrow_saturated_ranges: quantize an activation over the part of its range its consumers tell apart
            (a Hardswish / Hardsigmoid / SiLU input below the point where its gate is zero, a Clip's input
            inside the Clip's bounds), not its whole calibrated range: a finer step at no cost, since the
            values cut off saturate downstream anyway (:mod:`ortq.passes.saturation`).
        preset: the name of the preset this config came from, for reports.
    """

    KIND: ClassVar[str] = "static_int8"

    activations_dtype: QuantType = QuantType.QUInt8
    activations_symmetric: bool = False
    weights_dtype: QuantType = QuantType.QInt8
    weights_symmetric: bool = True
    weights_granularity: Granularity = field(default_factory=PerChannel)
    reduce_range: bool = False
    operators_to_quantize: tuple[str, ...] = DEFAULT_OPERATORS
    nodes_to_exclude: tuple[str, ...] = ()
    quantize_activation_matmuls: bool = False
    int8_chain: bool = True
    quantize_embeddings: bool = False
    tune_cpu_kernels: bool = False
    weight_storage_bits: int = 8
    storage_block_size: int = 32
    smooth_quant_alpha: float | str | None = None
    narrow_saturated_ranges: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "activations_dtype", _enum(QuantType, self.activations_dtype, "activations dtype"))
        object.__setattr__(self, "weights_dtype", _enum(QuantType, self.weights_dtype, "weights dtype"))
        if isinstance(self.weights_granularity, dict):
            object.__setattr__(self, "weights_granularity", _granularity_from_dict(self.weights_granularity))
        if not isinstance(self.weights_granularity, (PerTensor, PerChannel)):
            raise ConfigError(f"weights_granularity must be PerTensor() or PerChannel(), got {self.weights_granularity!r}")
        object.__setattr__(self, "operators_to_quantize", tuple(self.operators_to_quantize))
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))
        if not self.operators_to_quantize:
            raise ConfigError("operators_to_quantize is empty: nothing would be quantized")
        if self.weight_storage_bits not in (4, 8):
            raise ConfigError(f"weight_storage_bits must be 4 or 8, got {self.weight_storage_bits!r}")
        bs = self.storage_block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise ConfigError(f"storage_block_size must be a power of two >= 16, got {bs!r}")
        alpha = self.smooth_quant_alpha
        if alpha is not None and alpha != "auto":
            try:
                ok = 0.0 <= float(alpha) <= 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"smooth_quant_alpha must be 'auto' or a number in [0, 1], got {alpha!r}")

    @property
    def per_channel(self) -> bool:
        return isinstance(self.weights_granularity, PerChannel)



class WeightOnlyAlgorithm(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"


@dataclass(frozen=True)
class WeightOnlyConfig(_JsonConfig):
    """Weight-only quantization of MatMul weights to ``com.microsoft.MatMulNBits`` (and embeddings to
    ``GatherBlockQuantized``).

    Attributes:
        bits: 4 (or 8) bits per weight.
        block_size: weights per scale along the input dimension (power of two, >= 16).
        symmetric: symmetric blocks (no zero points).
        accuracy_level: MatMulNBits ``accuracy_level`` (0-4; 4 = int8 activations, the fast CPU path).
        algorithm: gptq (default; data-aware: without calibration data a text model calibrates on
            mixed-domain passages, see :mod:`ortq.corpus`, and a model without a tokenizer falls back to rtn)
            or rtn (round to nearest with a per-block clipping search), for the layers it re-quantizes. Chosen
            by perplexity on held-out out-of-domain text (news) of SmolLM2-135M re-quantized: gptq on mixed text
            +5.8 %, gptq on documentation alone +11.4 %, rtn with activation weighting +8.7 %, plain rtn +27.6 %.
        quantize_embeddings: large embedding Gathers become ``GatherBlockQuantized``.
        int8_nodes: node-name patterns (fnmatch) quantized to 8 bits instead.
        auto_int8_sensitive: also keep the most sensitive layers (the output projection / lm_head and an
            embedding table tied to it) at 8 bits.
        int8_block_size: block size of the 8-bit layers (symmetric); None: the largest power of two <= 128
            that divides K (and is >= block_size), else block_size.
        nodes_to_exclude: node-name patterns (fnmatch) left in float.
        keep_source_grid: a weight that already lies exactly on a block grid (a GGUF Q4_0 / Q4_1 / Q8_0
            source) keeps it, bit for bit, instead of being rounded again (the default: on SmolLM2-135M's Q4_1
            GGUF, +1.3 % / +1.4 % perplexity in-domain / on news at 99.9 MB, every layer with zero points and
            block offsets; ``benchmarks/int4_domains.py``).
        sensitive_budget: extra bytes, as a fraction of the bytes of the layers in the base format, spent on the
            layers whose measured error (relative output error on the calibration data) is largest per extra
            byte: each gets the grid its weight lies on (a GGUF source), else 8 bits (k-quant style mixed
            precision, chosen by measurement; :mod:`ortq.passes.weight_budget`). 0: none. On SmolLM2's GGUF,
            symmetric gptq: +3.9 % / +6.7 % at 91.4 MB without; with 0.1, +0.6 % / +0.4 % at 96.7 MB (every layer
            carries its Q4_1 grid, block offsets folded).
        block_offsets: a layer the sensitivity budget upgrades may carry a source grid that needs per-block
            offsets (a GGUF Q4_1 block minimum that is not a whole number of steps), at some run time (see
            ``fold_block_offsets``). Off: such a layer goes to 8 bits instead (``keep_source_grid``
            carries offsets whatever this says). On SmolLM2-135M's Q4_1 GGUF, budget 0.1: +0.6 % / +0.4 %
            perplexity (in-domain / news) with offsets, +3.7 % / +6.5 % without (``benchmarks/int4_domains.py``).
        fold_block_offsets: block offsets are stored as extra rows of the layer's ``MatMulNBits`` (codes of its
            bits, fed the activation's block sums: one small MatMul and a Concat per activation; a weight
            moves by a fraction of its block's step, relative RMS 0.005 on SmolLM2) instead of exactly in
            float (two MatMuls and an Add per layer). Folded offsets cost fewer bytes, so the budget carries
            more grids: on SmolLM2-135M all 120 layers at +0.6 % / +0.4 %, where exact offsets carry 97 at
            +1.6 % / +2.6 %, at about the same decode speed (:mod:`ortq.passes.block_offsets`).
        max_offset_layers: at most this many layers carry a grid with block offsets (the budget's next choice
            for the others is 8 bits). None: no limit.
        bias_correction: re-quantized layers get the mean error of their outputs back as a constant bias
            (``MatMulNBits``' bias input: free at run time), from the calibration activations' channel means,
            and GPTQ minimises the error of the centred activations (their mean's share goes to the bias).
        float16_scales: block scales (and a carried grid's block offsets) stored in float16 and cast to
            float32 by a constant ``Cast`` that ONNX Runtime folds when the session is created: half a bit per
            weight less on disk, the same kernels. A scale float16 cannot hold within 0.1 % stays float32.
            ONNX Runtime's ``MatMulNBits`` with ``accuracy_level`` 4 needs that folding: sessions with graph
            optimizations disabled (``ORT_DISABLE_ALL``) compute wrong results with such a model.
    """

    KIND: ClassVar[str] = "weight_only"

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = 4
    algorithm: WeightOnlyAlgorithm = WeightOnlyAlgorithm.GPTQ
    quantize_embeddings: bool = True
    int8_nodes: tuple[str, ...] = ()
    auto_int8_sensitive: bool = True
    nodes_to_exclude: tuple[str, ...] = ()
    int8_block_size: int | None = None
    tune_cpu_kernels: bool = True
    keep_source_grid: bool = False
    sensitive_budget: float = 0.1
    float16_scales: bool = True
    block_offsets: bool = True
    fold_block_offsets: bool = True
    bias_correction: bool = False
    max_offset_layers: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithm", _enum(WeightOnlyAlgorithm, self.algorithm, "weight-only algorithm"))
        object.__setattr__(self, "int8_nodes", tuple(self.int8_nodes))
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))
        if self.bits not in (4, 8):
            raise ConfigError(f"bits must be 4 or 8, got {self.bits!r}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise ConfigError(f"block_size must be a power of two >= 16, got {bs!r}")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0-4, got {self.accuracy_level!r}")
        b8 = self.int8_block_size
        if b8 is not None and (not isinstance(b8, int) or b8 < 16 or b8 & (b8 - 1)):
            raise ConfigError(f"int8_block_size must be a power of two >= 16, got {b8!r}")
        sb = self.sensitive_budget
        if isinstance(sb, bool) or not isinstance(sb, (int, float)) or not 0.0 <= sb <= 4.0:
            raise ConfigError(f"sensitive_budget must be a fraction >= 0 (of the base layers' bytes), got {sb!r}")
        mo = self.max_offset_layers
        if mo is not None and (isinstance(mo, bool) or not isinstance(mo, int) or mo < 0):
            raise ConfigError(f"max_offset_layers must be None or an integer >= 0, got {mo!r}")



AnyQuantizationConfig = QuantizationConfig | WeightOnlyConfig


def config_from_dict(data: dict[str, Any]) -> AnyQuantizationConfig:
    kind = data.get("kind", "static_int8")
    if kind == "static_int8":
        return QuantizationConfig.from_dict(data)
    if kind == "weight_only":
        return WeightOnlyConfig.from_dict(data)
    raise ConfigError(f"unknown quantization config kind {kind!r}")


# The named presets as a table: the defaults each preset gives a :class:`QuantizationConfig` (a caller's
# keyword arguments win). CPU presets: u8 activations / s8 weights, SmoothQuant searched per activation,
# 8-bit embedding tables, no fused kernels that measure slower here. GPU presets: s8s8 symmetric QDQ, attention
# MatMuls of two activations quantized too.
_CPU = {"smooth_quant_alpha": "auto", "quantize_embeddings": True, "tune_cpu_kernels": True}
_GPU = {
    "smooth_quant_alpha": "auto",
    "activations_dtype": QuantType.QInt8,
    "activations_symmetric": True,
    "quantize_activation_matmuls": True,
}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "avx2": (
        "x86 with AVX2 (no VNNI): u8 activations, s8 weights, 7-bit weights (``reduce_range``) against the "
        "saturation of vpmaddubsw's u8 x s8 pairs.",
        {**_CPU, "reduce_range": True},
    ),
    "avx512": ("AVX512 without VNNI: as AVX2, 7-bit weights.", {**_CPU, "reduce_range": True}),
    "avx512_vnni": ("x86 with AVX512-VNNI / AVX-VNNI / AMX: full 8-bit u8s8.", dict(_CPU)),
    "arm64": ("ARM64 (NEON / dot product): u8 activations, s8 weights.", dict(_CPU)),
    "tensorrt": ("TensorRT: s8s8, symmetric activations and weights.", dict(_GPU)),
    "cuda": ("CUDA EP: s8s8 symmetric QDQ.", dict(_GPU)),
}
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {name: defaults for name, (_, defaults) in PRESETS.items()}


def preset_config(name: str, *, is_static: bool = True, per_channel: bool = True, **kwargs: Any) -> QuantizationConfig:
    """The :class:`QuantizationConfig` of preset ``name`` with ``kwargs`` overriding its defaults."""
    if name not in PRESET_DEFAULTS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: auto, {', '.join(PRESET_DEFAULTS)}")
    if not is_static:
        raise ConfigError(
            f"{name}: dynamic quantization is not offered; use is_static=True (calibrated QDQ int8) "
            "or WeightOnlyConfig for weight-only int4"
        )
    params = {**PRESET_DEFAULTS[name], **kwargs}
    params.setdefault("weights_granularity", PerChannel() if per_channel else PerTensor())
    return QuantizationConfig(preset=name, **params)


def _preset_factory(name: str):
    def factory(is_static: bool = True, per_channel: bool = True, **kwargs: Any) -> QuantizationConfig:
        return preset_config(name, is_static=is_static, per_channel=per_channel, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = PRESETS[name][0]
    return staticmethod(factory)


class AutoQuantizationConfig:
    """Named presets with Optimum's names (see :data:`PRESETS`); each returns a :class:`QuantizationConfig`,
    keyword arguments override the preset's defaults."""

    PRESETS = tuple(PRESETS)
    avx2 = _preset_factory("avx2")
    avx512 = _preset_factory("avx512")
    avx512_vnni = _preset_factory("avx512_vnni")
    arm64 = _preset_factory("arm64")
    tensorrt = _preset_factory("tensorrt")
    cuda = _preset_factory("cuda")

    @staticmethod
    def weight_only(bits: int = 4, block_size: int = 32, **kwargs: Any) -> WeightOnlyConfig:
        return WeightOnlyConfig(bits=bits, block_size=block_size, **kwargs)

    @staticmethod
    def for_host(**kwargs: Any) -> QuantizationConfig:
        """The preset that suits this machine's CPU."""
        from ortq.hostinfo import cpu_features

        feats = cpu_features()
        if feats.get("amx") or feats.get("avx512_vnni") or feats.get("avx_vnni"):
            return preset_config("avx512_vnni", **kwargs)
        if feats.get("neon"):
            return preset_config("arm64", **kwargs)
        if feats.get("avx512"):
            return preset_config("avx512", **kwargs)
        return preset_config("avx2", **kwargs)

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> QuantizationConfig:
        if name == "auto":
            return cls.for_host(**kwargs)
        return preset_config(name, **kwargs)


class AutoCalibrationConfig:
    """Calibration configs with Optimum's names. ``dataset`` is accepted for compatibility; its length caps
    ``num_samples`` when given."""

    @staticmethod
    def _make(method: CalibrationMethod, dataset: Any, **kwargs: Any) -> CalibrationConfig:
        """``num_samples`` defaults to the length of ``dataset`` when it has one."""
        if kwargs.get("num_samples") is None and dataset is not None:
            try:
                kwargs["num_samples"] = len(dataset)
            except TypeError:
                kwargs.pop("num_samples", None)
        return CalibrationConfig(method=method, **kwargs)

    @staticmethod
    def minmax(dataset: Any = None, moving_average: bool = False, averaging_constant: float = 0.01, **kwargs: Any):
        return AutoCalibrationConfig._make(
            CalibrationMethod.MINMAX, dataset, moving_average=moving_average,
            averaging_constant=averaging_constant, **kwargs,
        )

    @staticmethod
    def percentiles(dataset: Any = None, percentile: float = 99.999, num_bins: int = 2048, **kwargs: Any):
        return AutoCalibrationConfig._make(
            CalibrationMethod.PERCENTILE, dataset, percentile=percentile, num_bins=num_bins, **kwargs
        )

    @staticmethod
    def entropy(dataset: Any = None, num_bins: int = 2048, num_quantized_bins: int = 128, **kwargs: Any):
        return AutoCalibrationConfig._make(
            CalibrationMethod.ENTROPY, dataset, num_bins=num_bins, num_quantized_bins=num_quantized_bins, **kwargs
        )

    @staticmethod
    def from_method(method: str, **kwargs: Any) -> CalibrationConfig:
        m = _enum(CalibrationMethod, method, "calibration method")
        return CalibrationConfig(method=m, **kwargs)
