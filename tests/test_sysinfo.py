"""`mergeq env` and what results files record about the machine."""
from __future__ import annotations

import json

import pytest

from mergeq import cli
from mergeq.errors import MergeqError
from mergeq.sysinfo import FLAGS, cpu, environment, has_vnni


def test_cpu_flags_and_vnni_agree():
    c = cpu()
    assert c["model"] and set(c["flags"]) <= set(FLAGS)
    assert c["vnni"] == has_vnni()
    if c["arch"] == "x86_64":
        assert has_vnni() == bool({"avx512_vnni", "avx_vnni"} & set(c["flags"]))


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
