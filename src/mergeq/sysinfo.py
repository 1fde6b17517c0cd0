"""What machine a result came from: CPU model and the instruction sets that change numbers or
kernels (AVX2, AVX-512, VNNI), thread count, library versions, CUDA devices.

Float rounding differs between CPU kinds (PyTorch's kernels pick other vector widths and
summation orders on AVX2 and AVX-512), and onnxruntime's uint8 x int8 kernels are exact only
with VNNI (:func:`mergeq.deploy.integer.saturation_free`), so every results file records this.

The instruction sets are the ones CPUID reports when executed in this process, which is what the
kernels see: under emulation (QEMU's ``-cpu Haswell-v4``) or in a VM that masks features,
/proc/cpuinfo still lists the host's. The reader is PyTorch's (``torch.cpu.get_capabilities``,
pytorch/cpuinfo), or NumPy's where PyTorch is too old to have it (NumPy names no AVX-VNNI and
no AMX: such a CPU then counts as without VNNI, which keeps int8 exports exact and only slower).
Only the model name comes from /proc/cpuinfo (the host's, under emulation); ``cpu()["source"]`` says
which source gave what.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # as /proc/cpuinfo names them
_TORCH_NAMES = {"avx512f": "avx512_f"}  # torch.cpu.get_capabilities' names, where they differ
_NUMPY_NAMES = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_vnni": "AVX512VNNI"}  # NumPy's __cpu_features__


@lru_cache(maxsize=1)
def _model_name() -> tuple[str, str]:
    """``(model name, where it came from)``: /proc/cpuinfo (Linux), elsewhere the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip(), "/proc/cpuinfo"
    except OSError:
        pass
    return platform.processor() or platform.machine(), "platform.processor()"


@lru_cache(maxsize=1)
def _cpuid() -> tuple[frozenset[str], str]:
    """``(the FLAGS this process's CPU has, the reader)``, from CPUID executed in this process."""
    try:
        from torch.cpu import get_capabilities
    except ImportError:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as features
        except ImportError:  # NumPy 1.x
            from numpy.core._multiarray_umath import __cpu_features__ as features
        return frozenset(f for f, n in _NUMPY_NAMES.items() if features.get(n)), "numpy __cpu_features__"
    caps = get_capabilities()
    return frozenset(f for f in FLAGS if caps.get(_TORCH_NAMES.get(f, f)) is True), "torch.cpu.get_capabilities"


def cpu() -> dict[str, Any]:
    """The CPU: model name, architecture, the flags in :data:`FLAGS` it has, whether it has VNNI,
    and the source of the model name and of the flags."""
    (model, model_source), (flags, flag_source) = _model_name(), _cpuid()
    return {"model": model, "arch": platform.machine(), "flags": [f for f in FLAGS if f in flags],
            "vnni": has_vnni(),
            "source": {"model": model_source, "flags": f"CPUID in this process, read by {flag_source}"}}


def has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI on x86; ARM's
    dot-product kernels do not saturate either), so uint8 x int8 kernels are exact."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(_cpuid()[0] & {"avx512_vnni", "avx_vnni"})


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
