"""`mergeq env` and what results files record about the machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergeq import cli, sysinfo
from mergeq.deploy.emulate import AVX2_CPU, qemu
from mergeq.deploy.integer import resolve_target_cpu
from mergeq.errors import MergeqError
from mergeq.sysinfo import FLAGS, cpu, environment, has_vnni

SRC = Path(sysinfo.__file__).parents[1]
needs_qemu = pytest.mark.skipif(qemu() is None, reason="needs QEMU's user-mode emulator (apt-get install qemu-user)")


@pytest.fixture
def fresh_cpuid():
    sysinfo._cpuid.cache_clear()
    yield
    sysinfo._cpuid.cache_clear()


def test_cpu_flags_and_vnni_agree():
    c = cpu()
    assert c["model"] and set(c["flags"]) <= set(FLAGS)
    assert c["vnni"] == has_vnni()
    if c["arch"] == "x86_64":
        assert has_vnni() == bool({"avx512_vnni", "avx_vnni"} & set(c["flags"]))


def test_cpu_flags_come_from_cpuid_in_this_process_not_proc_cpuinfo(monkeypatch, fresh_cpuid, capsys):
    """Issue 31: under QEMU's Haswell /proc/cpuinfo lists the host's VNNI; the facts, `env` and
    `--target-cpu native` follow what CPUID returns in the process (here a mocked AVX2-only CPU)."""
    haswell = {"avx2": True, "avx512_f": False, "avx512_vnni": False, "avx_vnni": False, "amx_int8": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: haswell)
    assert cpu()["flags"] == ["avx2"] and not cpu()["vnni"] and resolve_target_cpu("native") == "any"
    assert cpu()["source"]["flags"] == "CPUID in this process, read by torch.cpu.get_capabilities"
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "cpu flags: avx2 (from CPUID in this process" in out and "--target-cpu native means any" in out
    # a torch without get_capabilities: NumPy's reader, which also runs CPUID in the process
    features = getattr(np, "_core", getattr(np, "core", None))._multiarray_umath.__cpu_features__

    monkeypatch.delattr(torch.cpu, "get_capabilities")
    for name, value in {"AVX2": True, "AVX512F": True, "AVX512VNNI": True}.items():
        monkeypatch.setitem(features, name, value)
    sysinfo._cpuid.cache_clear()
    assert cpu()["flags"] == ["avx2", "avx512f", "avx512_vnni"] and resolve_target_cpu("native") == "vnni"
    assert cpu()["source"]["flags"] == "CPUID in this process, read by numpy __cpu_features__"


def test_torch_and_numpy_cpuid_readers_agree_here(monkeypatch, fresh_cpuid):
    torch_flags = set(cpu()["flags"])
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    sysinfo._cpuid.cache_clear()
    assert set(cpu()["flags"]) == torch_flags - {"avx_vnni", "amx_int8"}  # NumPy names neither


def _emulated(code: str) -> dict:
    out = subprocess.run([qemu(), "-cpu", AVX2_CPU, sys.executable, "-c", code], check=True, timeout=600,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}).stdout
    return json.loads(out)


@needs_qemu
def test_cpu_facts_on_an_emulated_avx2_cpu_say_avx2_and_no_vnni():
    """Under ``qemu-x86_64 -cpu Haswell-v4`` /proc/cpuinfo is the host's (with VNNI here, where the
    host has it); the facts are the emulated CPU's. NumPy's reader: importing torch under QEMU
    takes half a minute (the slow test below covers torch's reader and `mergeq env`)."""
    c = _emulated(f"import sys, json; sys.modules['torch'] = None; sys.path.insert(0, {str(SRC / 'mergeq')!r})\n"
                  "import sysinfo; print(json.dumps(sysinfo.cpu()))")
    assert c["flags"] == ["avx2"] and c["vnni"] is False and "numpy" in c["source"]["flags"]


@pytest.mark.slow
@needs_qemu
def test_env_on_an_emulated_avx2_cpu_says_avx2_and_no_vnni():
    env = _emulated("from mergeq.cli import main; main(['env', '--json'])")
    assert env["cpu"]["flags"] == ["avx2"] and env["cpu"]["vnni"] is False
    assert env["torch_cpu_capability"] == "AVX2" and env["int8_export_target_cpu"] == "any"


def test_env_command_prints_versions_cpu_and_the_int8_choice(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch: " in out and "onnxruntime: " in out and f"cpu: {cpu()['model']}" in out
    assert f"--target-cpu native means {'vnni' if has_vnni() else 'any'}" in out
    assert cli.main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["cpu"] == cpu() and env["versions"]["torch"] and env == json.loads(json.dumps(environment()))


def test_onnx_export_without_the_deploy_extra_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(MergeqError, match=r"ONNX export needs onnx: pip install 'mergeq\[deploy\]'"):
        cli.require_deploy_extra()
