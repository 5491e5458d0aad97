import json

import pytest

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
    config_from_dict,
)
from ortq.errors import ConfigError

PRESETS = ["avx2", "avx512", "avx512_vnni", "arm64", "tensorrt", "cuda"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_json(name):
    config = AutoQuantizationConfig.from_name(name)
    assert config.preset == name
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_preset_choices():
    assert AutoQuantizationConfig.avx2().reduce_range
    assert not AutoQuantizationConfig.avx512_vnni().reduce_range
    trt = AutoQuantizationConfig.tensorrt()
    assert trt.activations_dtype is QuantType.QInt8 and trt.activations_symmetric
    assert AutoQuantizationConfig.arm64(per_channel=False).weights_granularity == PerTensor()
    assert isinstance(AutoQuantizationConfig.for_host(), QuantizationConfig)


def test_optimum_style_calibration_configs():
    data = ["a", "b", "c"]
    assert AutoCalibrationConfig.minmax(data).num_samples == 3
    p = AutoCalibrationConfig.percentiles(data, percentile=99.9)
    assert p.method is CalibrationMethod.PERCENTILE and p.percentile == 99.9
    e = AutoCalibrationConfig.entropy(num_bins=1024, num_quantized_bins=64)
    assert e.method is CalibrationMethod.ENTROPY and e.num_quantized_bins == 64
    assert CalibrationConfig.from_dict(e.to_dict()) == e


def test_weight_only_round_trip():
    config = WeightOnlyConfig(block_size=64, symmetric=True, int8_nodes=("lm_head*",))
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "make",
    [
        lambda: CalibrationConfig(method="kl"),
        lambda: CalibrationConfig(percentile=0),
        lambda: CalibrationConfig(percentile=101),
        lambda: CalibrationConfig(num_bins=4),
        lambda: CalibrationConfig(num_quantized_bins=4096),
        lambda: CalibrationConfig(num_samples=0),
        lambda: CalibrationConfig(batch_size=-1),
        lambda: CalibrationConfig(averaging_constant=0),
        lambda: QuantizationConfig(activations_dtype="int4"),
        lambda: QuantizationConfig(operators_to_quantize=()),
        lambda: QuantizationConfig(smooth_quant_alpha=1.5),
        lambda: QuantizationConfig(weights_granularity="channel"),
        lambda: WeightOnlyConfig(block_size=24),
        lambda: WeightOnlyConfig(bits=3),
        lambda: WeightOnlyConfig(accuracy_level=7),
        lambda: WeightOnlyConfig(algorithm="magic"),
        lambda: AutoQuantizationConfig.from_name("avx9"),
        lambda: AutoQuantizationConfig.avx2(is_static=False),
        lambda: QuantizationConfig.from_dict({"bogus": 1}),
    ],
)
def test_invalid_values_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_granularity_objects():
    assert QuantizationConfig().per_channel
    assert QuantizationConfig(weights_granularity=PerChannel(axis=0)).weights_granularity.axis == 0
