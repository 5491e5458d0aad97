"""ortq: export PyTorch / Hugging Face models to ONNX, calibrate, quantize (QDQ int8, int4 MatMulNBits), validate."""

from ortq.config import (
    AutoCalibrationConfig,
    AutoQuantizationConfig,
    CalibrationConfig,
    CalibrationMethod,
    PerChannel,
    PerTensor,
    QuantizationConfig,
    QuantType,
    WeightOnlyConfig,
)
from ortq.errors import OrtqError

__version__ = "0.1.0"

# The pipeline's entry points, imported on first use (ortq.export pulls in torch only when it runs).
_LAZY = {
    "ORTQuantizer": ("ortq.quantizer", "ORTQuantizer"),
    "export": ("ortq.export", "export"),
    "validate": ("ortq.validate", "validate"),
    "real_text": ("ortq.data", "real_text"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ortq' has no attribute {name!r}")

__all__ = [
    "AutoCalibrationConfig",
    "AutoQuantizationConfig",
    "CalibrationConfig",
    "CalibrationMethod",
    "ORTQuantizer",
    "OrtqError",
    "PerChannel",
    "PerTensor",
    "QuantType",
    "QuantizationConfig",
    "WeightOnlyConfig",
    "__version__",
    "export",
    "real_text",
    "validate",
]
