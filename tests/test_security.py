"""Loading a model file runs no code the file names (issue 24, item 1): a ``builder`` in a
checkpoint's metadata is refused unless the user passes the model or trusts the file."""
import sys

import pytest
import torch
import yaml

from mergeq.checkpoint import model_from_checkpoint, save_model
from mergeq.cli import main
from mergeq.deploy import load_packed, save_packed
from mergeq.errors import UntrustedCodeError
from mergeq.io import save_checkpoint
from mergeq.models import build_model
from mergeq.ptq import quantize
from mergeq.quant import QuantConfig

NETS = '''
import mergeq.models

CALLS = []


def make(num_classes=10, width=8):
    CALLS.append(width)
    return mergeq.models.build_model("resnet8", num_classes, width=width)
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """An importable builder module that records each call."""
    (tmp_path / "mq_trusted_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mq_trusted_nets", None)
    yield __import__("mq_trusted_nets")
    sys.modules.pop("mq_trusted_nets", None)


def _state(width=8):
    torch.manual_seed(0)
    return build_model("resnet8", 10, width=width).state_dict()


@pytest.fixture
def hostile(tmp_path):
    """A checkpoint whose metadata names ``os:system`` with a command that writes a marker file."""
    marker = tmp_path / "PWNED"
    meta = {"model": {"builder": "os:system", "kwargs": {"command": f"echo PWNED > {marker}"}}, "num_classes": 10}
    return save_checkpoint(_state(), tmp_path / "hostile.safetensors", meta), marker


def test_builder_named_in_a_checkpoint_never_runs_from_python(hostile):
    path, marker = hostile
    with pytest.raises(UntrustedCodeError, match=r"names the model builder 'os:system'.*template=.*trust_builder=True"):
        model_from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["export", "--model", "{ckpt}", "--out", "{tmp}/x.onnx", "--format", "onnx"],
    ["export", "--model", "{ckpt}", "--out", "{tmp}/x.safetensors"],
    ["merge", "{ckpt}", "{ckpt}", "--out", "{tmp}/m.safetensors"],
    ["merge", "{ok}", "{ok}", "--method", "task_arithmetic", "--base", "{ckpt}", "--out", "{tmp}/m.safetensors"],
    ["quantize", "--model", "{ckpt}", "--domain", "uci", "--out", "{tmp}/q.safetensors", "--quiet"],
    ["adapt", "--source", "{ckpt}", "--domain", "uci", "--out", "{tmp}/a.safetensors", "--quiet"],
])
def test_builder_named_in_a_checkpoint_never_runs_from_the_cli(hostile, tmp_path, capsys, command):
    path, marker = hostile
    ok = save_model(build_model("resnet8", 10, width=8), tmp_path / "ok.safetensors",
                    {"arch": "resnet8", "arch_kwargs": {"width": 8}, "num_classes": 10})
    argv = [a.format(ckpt=path, tmp=tmp_path, ok=ok) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and "names the model builder 'os:system'" in err and "--trust-builder" in err


def test_a_packed_export_naming_a_builder_is_refused(nets, tmp_path):
    spec = {"builder": "mq_trusted_nets:make", "kwargs": {"width": 8}}
    template = nets.make(10, 8)
    q = quantize(template, "rtn", calib=torch.randn(2, 3, 32, 32), config=QuantConfig(4, 4, step_method="absmax"))
    packed = save_packed(q, tmp_path / "p.safetensors", {"model": spec, "num_classes": 10})
    nets.CALLS.clear()
    with pytest.raises(UntrustedCodeError, match="p.safetensors names the model builder 'mq_trusted_nets:make'"):
        load_packed(packed)
    assert nets.CALLS == []
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_packed(packed, template=template)(x), q(x))
    assert torch.equal(load_packed(packed, trust_builder=True)(x), q(x)) and nets.CALLS == [8]


def test_trusted_builder_the_config_model_or_a_template_load_it(nets, tmp_path, capsys):
    spec = {"builder": "mq_trusted_nets:make", "kwargs": {"width": 8}}
    model = nets.make(10, 8)
    path = save_model(model, tmp_path / "lab.safetensors", {"model": spec, "num_classes": 10})
    nets.CALLS.clear()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model_from_checkpoint(path, template=model)[0](x), model.eval()(x)) and nets.CALLS == []
    assert torch.equal(model_from_checkpoint(path, trust_builder=True)[0](x), model(x)) and set(nets.CALLS) == {8}
    out = tmp_path / "p.safetensors"
    assert main(["export", "--model", str(path), "--out", str(out)]) == 2  # not quantized, but refused first
    assert "--trust-builder" in capsys.readouterr().err
    config = tmp_path / "lab.yaml"
    config.write_text(yaml.safe_dump({"model": spec}))
    nets.CALLS.clear()
    for extra in (["--config", str(config)], ["--trust-builder"]):
        assert main(["export", "--model", str(path), "--out", str(out), *extra]) == 2
        assert "has no QuantModule" in capsys.readouterr().err  # the model was built: export got to its own check
    assert nets.CALLS == [8, 8]
