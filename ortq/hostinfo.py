"""What this machine offers ONNX Runtime: CPU instruction sets, GPUs, library versions.

:func:`cpu_features` drives :meth:`ortq.config.AutoQuantizationConfig.for_host`; :func:`host_info` is the
``host`` block of a validation report. Nothing here imports torch unless a GPU must be named and
``nvidia-smi`` is missing.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

logger = logging.getLogger(__name__)

# Linux /proc/cpuinfo flag names (x86 "flags", arm64 "Features") -> our feature names.
_X86_FLAGS = {
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}
_ARM_FLAGS = {
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
    "fphp": "fp16",
    "asimdhp": "fp16",
    "bf16": "bf16",
    "sme": "sme",
}
# macOS sysctl keys (hw.optional.*) -> our feature names.
_DARWIN_KEYS = {
    "hw.optional.neon": "neon",
    "hw.optional.AdvSIMD": "neon",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512",
    "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vl": "avx512vl",
    "hw.optional.avx512vnni": "avx512_vnni",
    "hw.optional.fma": "fma",
}

FEATURE_NAMES = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "dotprod",
    "i8mm",
    "sve",
    "sve2",
    "fp16",
    "bf16",
    "sme",
)


def _is_arm(machine: str) -> bool:
    m = machine.lower()
    return m.startswith(("arm", "aarch64"))


def features_from_flags(flags: set[str] | list[str], machine: str | None = None) -> dict[str, bool]:
    """Map a set of OS CPU flag names (as in ``/proc/cpuinfo``) to ortq's feature dict.

    Args:
        flags: lower-case flag names, e.g. ``{"avx2", "avx512f", "avx512_vnni"}`` or ``{"asimd", "asimddp"}``.
        machine: ``platform.machine()`` value; 64-bit ARM always has NEON even when no flag says so.

    Returns:
        Every name of :data:`FEATURE_NAMES` mapped to a boolean. ``amx`` means int8 AMX tiles
        (``amx_tile`` and ``amx_int8``).
    """
    flags = {f.strip().lower() for f in flags}
    feats = dict.fromkeys(FEATURE_NAMES, False)
    for table in (_X86_FLAGS, _ARM_FLAGS):
        for flag, name in table.items():
            if flag in flags:
                feats[name] = True
    if machine is not None and machine.lower() in ("aarch64", "arm64"):
        feats["neon"] = True  # Advanced SIMD is mandatory on AArch64.
    feats["amx"] = feats["amx_tile"] and feats["amx_int8"]
    return feats


def _linux_flags() -> set[str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags.update(value.split())
                    break  # every core lists the same flags
    except OSError as exc:
        logger.debug("cannot read /proc/cpuinfo: %s", exc)
    return flags


def _darwin_features() -> dict[str, bool]:
    found: dict[str, bool] = {}
    sysctl = shutil.which("sysctl") or "/usr/sbin/sysctl"
    for key, name in _DARWIN_KEYS.items():
        try:
            out = subprocess.run([sysctl, "-n", key], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip() == "1":
            found[name] = True
    return found


@functools.lru_cache(maxsize=1)
def _cpu_features_cached() -> tuple[tuple[str, bool], ...]:
    machine = platform.machine()
    system = platform.system()
    if system == "Linux":
        feats = features_from_flags(_linux_flags(), machine)
    elif system == "Darwin":
        feats = features_from_flags(set(), machine)
        feats.update(_darwin_features())
    else:
        # Windows and others: no portable flag source without extra packages; be conservative.
        feats = features_from_flags(set(), machine)
        if machine.lower() in ("amd64", "x86_64"):
            feats["avx2"] = _windows_has_avx2()
    return tuple(feats.items())


def _windows_has_avx2() -> bool:
    try:  # PF_AVX2_INSTRUCTIONS_AVAILABLE = 40
        import ctypes

        return bool(ctypes.windll.kernel32.IsProcessorFeaturePresent(40))  # type: ignore[attr-defined]
    except Exception:
        return False


def cpu_features() -> dict[str, bool]:
    """CPU instruction-set features relevant to ONNX Runtime's int8 and int4 kernels.

    Keys always present: ``avx2``, ``avx512`` (AVX512F), ``avx512_vnni``, ``avx_vnni``, ``amx`` (AMX-INT8
    tiles), ``neon``, plus ``fma``, ``f16c``, ``avx512bw``, ``avx512vl``, ``avx512_bf16``, ``avx512_fp16``,
    ``dotprod``, ``i8mm``, ``sve``, ``sve2``, ``fp16``, ``bf16``, ``sme`` and the ``amx_*`` parts. The result is
    cached for the process; a copy is returned.
    """
    return dict(_cpu_features_cached())


# The int8 GEMM path of ONNX Runtime's MLAS for each CPU feature, best first.
_INT8_PATHS = (
    ("amx", "amx: int8 tiles (u8s8 and s8s8), full 8-bit range"),
    ("avx512_vnni", "avx512_vnni: vpdpbusd u8s8, full 8-bit range"),
    ("avx_vnni", "avx_vnni: vpdpbusd (VEX) u8s8, full 8-bit range"),
    ("avx512bw", "avx512bw: vpmaddubsw u8s8, 16-bit intermediate can saturate (use reduce_range)"),
    ("avx2", "avx2: vpmaddubsw u8s8, 16-bit intermediate can saturate (use reduce_range)"),
    ("i8mm", "arm64 i8mm: smmla/ummla int8 matrix multiply"),
    ("dotprod", "arm64 dotprod: sdot/udot int8"),
    ("neon", "arm64 neon: widening int8 multiply-accumulate"),
)


def int8_kernel_path(features: dict[str, bool] | None = None) -> str:
    """The int8 GEMM path ONNX Runtime's MLAS takes on this CPU, in words, with its consequence."""
    f = cpu_features() if features is None else features
    for feature, path in _INT8_PATHS:
        if f.get(feature):
            return path
    return "scalar or SSE int8 (slow): int8 is unlikely to beat fp32 on this CPU"


def cpu_name() -> str:
    """The CPU model string (``/proc/cpuinfo`` model name, sysctl brand string, or ``platform.processor``)."""
    system = platform.system()
    if system == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key.strip().lower() in ("model name", "cpu model", "hardware"):
                        return value.strip()
        except OSError:
            pass
    elif system == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _nvidia_smi_gpus() -> list[dict[str, Any]] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    # Older drivers do not know compute_cap: the query is retried without it.
    for fields in ("index,name,driver_version,memory.total,compute_cap", "index,name,driver_version,memory.total"):
        try:
            out = subprocess.run(
                [smi, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
            )
        except (OSError, subprocess.SubprocessError) as exc:
            logger.debug("nvidia-smi failed: %s", exc)
            return None
        if out.returncode == 0:
            break
    else:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        gpu: dict[str, Any] = {
            "index": int(parts[0]) if parts[0].isdigit() else parts[0],
            "name": parts[1],
            "driver": parts[2],
            "memory": parts[3],
            "source": "nvidia-smi",
        }
        if len(parts) > 4:
            gpu["compute_capability"] = parts[4]
        gpus.append(gpu)
    return gpus


def _torch_gpus() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "memory": f"{props.total_memory // (1024 * 1024)} MiB",
                    "compute_capability": f"{props.major}.{props.minor}",
                    "source": "torch.cuda",
                }
            )
        return gpus
    except Exception as exc:  # a broken CUDA install must not break a report
        logger.debug("torch.cuda query failed: %s", exc)
        return []


def gpu_info(*, use_torch: bool = True) -> list[dict[str, Any]]:
    """NVIDIA GPUs visible to this process: ``nvidia-smi`` first, then ``torch.cuda`` when allowed.

    Returns:
        One dict per GPU (index, name, driver, memory, compute_capability, source); empty without a GPU.
    """
    gpus = _nvidia_smi_gpus()
    if gpus is not None:
        return gpus
    if use_torch and os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        return _torch_gpus()
    return []


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def host_info(*, gpus: bool = True) -> dict[str, Any]:
    """The ``host`` block of a report: OS, CPU name and features, int8 path, GPUs, library versions.

    Args:
        gpus: query GPUs (nvidia-smi / torch.cuda). Reports pass True only when a GPU provider was requested
            or is available, so a CPU-only run never imports torch.
    """
    import onnxruntime as ort

    feats = cpu_features()
    info: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "cpu_features": feats,
        "int8_kernel_path": int8_kernel_path(feats),
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "onnxruntime_package": _ort_package_name(),
        "onnxruntime_providers": list(ort.get_available_providers()),
        "onnx": _version("onnx"),
        "numpy": _version("numpy"),
        "ortq": _ortq_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        try:
            info["usable_cpus"] = len(os.sched_getaffinity(0))
        except OSError:
            pass
    info["gpus"] = gpu_info() if gpus else []
    return info


def _ortq_version() -> str:
    from ortq import __version__

    return __version__


def _ort_package_name() -> str | None:
    for name in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-openvino", "onnxruntime-directml"):
        if _version(name) is not None:
            return name
    return None
