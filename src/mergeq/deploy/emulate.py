"""Run ONNX files with onnxruntime on an emulated x86 CPU of another kind (QEMU user mode).

onnxruntime picks its integer kernels from the CPU it runs on, so an export that is exact on
this machine may not be on a user's. ``qemu-x86_64 -cpu Haswell-v4`` presents an AVX2 CPU
without AVX-512 and without VNNI (QEMU's TCG has no AVX-512), on which onnxruntime takes its
AVX2 uint8 x int8 kernels whose pair sums saturate. Emulation is slow (seconds for a small
model) and says nothing about speed; it checks what the kernels compute.

    outs = run_emulated([("m.onnx", x)], cpu="Haswell-v4")   # needs qemu-user (Debian: qemu-user)

Run as a script (by path, so that it imports neither torch nor mergeq under emulation), it reads
``model.onnx in.npy out.npy`` triples and writes each model's first output.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

AVX2_CPU = "Haswell-v4"  # AVX2, FMA; no AVX-512, no VNNI


def qemu() -> str | None:
    """The ``qemu-x86_64`` user-mode emulator, where installed on an x86-64 host."""
    return shutil.which("qemu-x86_64")


def run_emulated(jobs: list[tuple[str | Path, np.ndarray]], cpu: str = AVX2_CPU, timeout: float = 600) -> list[np.ndarray]:
    """Each ``(onnx_path, input)``'s first output, computed by onnxruntime (one thread) on ``cpu``."""
    emulator = qemu()
    if emulator is None:
        raise RuntimeError("qemu-x86_64 not found: install QEMU's user-mode emulator (Debian: apt-get install qemu-user)")
    with tempfile.TemporaryDirectory() as tmp:
        argv = []
        for i, (path, x) in enumerate(jobs):
            np.save(Path(tmp) / f"in{i}.npy", np.ascontiguousarray(x, dtype=np.float32))
            argv += [str(path), str(Path(tmp) / f"in{i}.npy"), str(Path(tmp) / f"out{i}.npy")]
        subprocess.run([emulator, "-cpu", cpu, sys.executable, __file__, *argv], check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return [np.load(Path(tmp) / f"out{i}.npy") for i in range(len(jobs))]


def _main(argv: list[str]) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for model, x, out in zip(argv[0::3], argv[1::3], argv[2::3]):
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        np.save(out, sess.run(None, {sess.get_inputs()[0].name: np.load(x)})[0])


if __name__ == "__main__":
    _main(sys.argv[1:])
