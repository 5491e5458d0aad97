import pytest

from ortq.errors import ConfigError, MissingDependencyError, OrtqError, first_line, require


def test_first_line_strips_onnxruntime_prefix():
    exc = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : /src/onnxruntime/core/graph/model.cc:256 "
        "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&) "
        "Unsupported model IR version: 14, max supported IR version: 13\nsecond line"
    )
    assert first_line(exc) == "Unsupported model IR version: 14, max supported IR version: 13"
    assert first_line(ValueError("plain\nmore")) == "plain"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(ValueError("x" * 1000))) == 300


def test_hierarchy_and_optional_imports():
    assert issubclass(ConfigError, OrtqError) and issubclass(ConfigError, ValueError)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ortq\[plot\]'"):
        require("surely_not_a_module_ortq", "plot")
