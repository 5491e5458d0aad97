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

__all__ = [
    "AutoCalibrationConfig",
    "AutoQuantizationConfig",
    "CalibrationConfig",
    "CalibrationMethod",
    "OrtqError",
    "PerChannel",
    "PerTensor",
    "QuantType",
    "QuantizationConfig",
    "WeightOnlyConfig",
    "__version__",
]
