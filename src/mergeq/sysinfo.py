"""What machine a result came from: CPU model and the instruction sets that change numbers or
kernels (AVX2, AVX-512, VNNI), thread count, library versions, CUDA devices.

Float rounding differs between CPU kinds (PyTorch's kernels pick other vector widths and
summation orders on AVX2 and AVX-512), and onnxruntime's uint8 x int8 kernels are exact only
with VNNI (:func:`mergeq.deploy.integer.saturation_free`), so every results file records this.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # as /proc/cpuinfo names them


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """``(model name, flags)`` from /proc/cpuinfo (Linux); elsewhere the platform's processor name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = platform.processor() or platform.machine(), frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu() -> dict[str, Any]:
    """The CPU: model name, architecture, the flags in :data:`FLAGS` it has, whether it has VNNI."""
    model, flags = _cpuinfo()
    have = [f for f in FLAGS if f in flags]
    return {"model": model, "arch": platform.machine(), "flags": have, "vnni": has_vnni()}


def has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI on x86; ARM's
    dot-product kernels do not saturate either), so uint8 x int8 kernels are exact."""
    _, flags = _cpuinfo()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Everything :func:`cpu` says plus versions, torch's CPU capability, threads and CUDA devices."""
    import torch

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "versions": {"mergeq": _version("mergeq"), "python": platform.python_version(), "torch": torch.__version__,
                     "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"), "numpy": _version("numpy")},
        "cpu": cpu(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": cuda,
        "int8_export_target_cpu": "vnni" if has_vnni() else "any",
    }
