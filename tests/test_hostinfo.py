"""ortq.hostinfo: CPU feature mapping, GPU discovery without a GPU, the host block, and for_host."""

from __future__ import annotations

import subprocess
import types

import onnxruntime as ort
import pytest

from ortq import hostinfo
from ortq.config import AutoQuantizationConfig
from ortq.hostinfo import FEATURE_NAMES, cpu_features, features_from_flags, host_info, int8_kernel_path


def test_x86_flags_map_to_features():
    f = features_from_flags({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile"}, "x86_64")
    assert f["avx2"] and f["avx512"] and f["avx512_vnni"] and f["avx512bw"]
    assert not f["avx_vnni"] and not f["neon"]
    assert not f["amx"]  # tiles without AMX-INT8 are not int8 AMX
    assert features_from_flags({"amx_tile", "amx_int8"}, "x86_64")["amx"]
    assert set(f) == set(FEATURE_NAMES) and all(isinstance(v, bool) for v in f.values())


def test_arm_flags_map_to_features():
    f = features_from_flags({"fp", "asimd", "asimddp", "i8mm"}, "aarch64")
    assert f["neon"] and f["dotprod"] and f["i8mm"] and not f["avx2"]
    assert features_from_flags(set(), "arm64")["neon"]  # Advanced SIMD is mandatory on AArch64
    assert not features_from_flags(set(), "armv7l")["neon"]


def test_cpu_features_has_the_contract_keys_and_is_a_copy():
    f = cpu_features()
    for key in ("avx2", "avx512", "avx512_vnni", "avx_vnni", "amx", "neon"):
        assert isinstance(f[key], bool)
    f["avx2"] = "changed"
    assert isinstance(cpu_features()["avx2"], bool)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"amx_tile", "amx_int8", "avx512_vnni"}, "amx"),
        ({"avx512f", "avx512bw", "avx512_vnni"}, "avx512_vnni"),
        ({"avx2", "avx_vnni"}, "avx_vnni"),
        ({"avx2", "avx512f", "avx512bw"}, "avx512bw"),
        ({"avx2"}, "avx2"),
        ({"asimd", "asimddp"}, "arm64 dotprod"),
        (set(), "scalar"),
    ],
)
def test_int8_kernel_path(flags, expected):
    assert int8_kernel_path(features_from_flags(flags, "x86_64")).startswith(expected)


@pytest.mark.parametrize(
    ("flags", "preset"),
    [
        ({"avx2"}, "avx2"),
        ({"avx2", "avx512f"}, "avx512"),
        ({"avx2", "avx512f", "avx512_vnni"}, "avx512_vnni"),
        ({"avx2", "avx_vnni"}, "avx512_vnni"),
        ({"asimd"}, "arm64"),
    ],
)
def test_for_host_follows_cpu_features(monkeypatch, flags, preset):
    monkeypatch.setattr(hostinfo, "cpu_features", lambda: features_from_flags(flags, "x86_64"))
    assert AutoQuantizationConfig.for_host().preset == preset


def test_gpu_info_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(hostinfo.shutil, "which", lambda name: None)
    assert hostinfo.gpu_info(use_torch=False) == []


def test_gpu_info_parses_nvidia_smi(monkeypatch):
    monkeypatch.setattr(hostinfo.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def fake_run(cmd, **kwargs):
        assert cmd[0] == "/usr/bin/nvidia-smi"
        return types.SimpleNamespace(returncode=0, stdout="0, NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB, 9.0\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    gpus = hostinfo.gpu_info(use_torch=False)
    assert gpus == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "driver": "550.54.15",
            "memory": "81559 MiB",
            "source": "nvidia-smi",
            "compute_capability": "9.0",
        }
    ]


def test_host_info_block():
    h = host_info(gpus=False)
    assert h["onnxruntime"] == ort.__version__
    assert "CPUExecutionProvider" in h["onnxruntime_providers"]
    assert h["gpus"] == []
    assert h["cpu_features"] == cpu_features()
    assert h["int8_kernel_path"] == int8_kernel_path()
    assert h["ortq"]
