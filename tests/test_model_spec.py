"""``model:`` specs: registered names, torchvision / timm, your own builder, safetensors weights,
and the output adapter for models that return a dict, a tuple or an object with ``.logits``."""
from __future__ import annotations

import sys
import textwrap
from collections import namedtuple

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

import mergeq
from mergeq.adapt import ShotConfig, SourceConfig, shot, train_source
from mergeq.adapt.tta import Tent, run_stream
from mergeq.errors import ConfigError, ModelError
from mergeq.models import build_model, resolve_model, resolved_spec
from mergeq.nn import LogitsAdapter, select_logits
from mergeq.nn.blocks import partition

NETS = '''
import torch
from torch import nn
from torch.nn import functional as F


class Head(nn.Module):
    """A classifier block that returns a dict (or the logits tensor)."""

    def __init__(self, width, num_classes, as_dict):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)
        self.as_dict = as_dict

    def forward(self, x):
        f = x.mean(dim=(2, 3))
        logits = self.fc(f)
        return {"logits": logits, "features": f} if self.as_dict else logits


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8, as_dict=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = Head(width, num_classes, as_dict)

    def forward(self, x):
        return self.head(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, scale):
        return self.conv(x) * scale


class TwoInputs(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.block = Scaled()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(self.block(x, 2.0).mean(dim=(2, 3)))


def make(num_classes=10, width=8, as_dict=True):
    return Net(num_classes, width, as_dict)


def make_fixed():
    return Net(5)


def not_a_model(num_classes=10):
    return "model"
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    (folder / "mergeq_test_nets.py").write_text(textwrap.dedent(NETS))
    sys.path.insert(0, str(folder))
    yield "mergeq_test_nets"
    sys.path.remove(str(folder))
    sys.modules.pop("mergeq_test_nets", None)


def _toy(n=48, seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y, 2, 2] += 3.0
    return TensorDataset(x, y)


def _spec(nets, **kw):
    return {"builder": f"{nets}:make", "kwargs": {"width": 8}, "output": "logits", **kw}


def test_builder_with_dict_output_runs_everywhere(nets, one_thread):
    data = _toy()
    x = data.tensors[0]
    torch.manual_seed(0)
    model = resolve_model(_spec(nets), 3, example_input=x[:2])
    assert isinstance(model, LogitsAdapter) and model(x[:4]).shape == (4, 3)
    source = train_source(model, data, SourceConfig(steps=6, batch_size=16, color=0), seed=0)
    expert = shot(source, _toy(seed=1), ShotConfig(steps=3, batch_size=16), seed=0)
    assert set(mergeq.evaluate(expert, {"a": data})) == {"a", "hmean"}
    options = {"qdrop": {"iters": 2}, "hdrq": {"iters": 2}, "gptq": {},
               "epmq": {"experts": [expert], "expert_calib": [x]}}
    qs = {m: mergeq.quantize(expert, m, calib=x, w_bits=4, a_bits=None if m in ("gptq", "epmq") else 4,
                             source=source, **opts) for m, opts in options.items()}
    for q in qs.values():
        assert mergeq.evaluate(q, {"a": data})["a"] >= 0.0
    merged = mergeq.merge([qs["qdrop"], mergeq.quantize(source, "qdrop", calib=x, w_bits=4, a_bits=4, iters=2)])
    assert merged(x[:2]).shape == (2, 3)
    res = run_stream(Tent(expert), [("d", data)], batch_size=16)
    assert 0.0 <= res["mean_error"] <= 1.0


def test_reconstruction_through_the_selector_equals_a_tensor_model(nets, one_thread):
    """The last unit (a Head returning a dict) is reconstructed on the selected logits: the
    same weights as the same network returning the logits tensor."""
    mod = __import__(nets)
    torch.manual_seed(0)
    plain = mod.Net(3, 8, as_dict=False).eval()
    dict_net = mod.Net(3, 8, as_dict=True)
    dict_net.load_state_dict(plain.state_dict())
    wrapped = LogitsAdapter(dict_net, "auto").eval()
    x = _toy().tensors[0]
    assert [n for n, _ in partition(wrapped, x[:2])] == ["model.conv1", "model.conv2", "model.head"]
    for method in ("brecq", "hdrq"):
        a = mergeq.quantize(plain, method, calib=x, w_bits=3, a_bits=4, iters=4, seed=1, source=plain)
        b = mergeq.quantize(wrapped, method, calib=x, w_bits=3, a_bits=4, iters=4, seed=1, source=wrapped)
        sa, sb = a.state_dict(), b.state_dict()
        assert sb.keys() == {f"model.{k}" for k in sa}
        assert all(torch.equal(sa[k], sb[f"model.{k}"]) for k in sa), method


def test_units_that_are_not_tensor_to_tensor_are_refused_by_name(nets):
    mod = __import__(nets)
    x = _toy().tensors[0]
    with pytest.raises(ModelError, match=r"unit 'head' \(Head\) returns a dict with keys \['logits', 'features'\]"):
        mergeq.quantize(mod.Net(3), "brecq", calib=x, w_bits=4, a_bits=4, iters=1)
    with pytest.raises(ModelError, match=r"unit 'block' \(Scaled\) is called with a tensor, a float"):
        mergeq.quantize(mod.TwoInputs(3), "qdrop", calib=x, w_bits=4, a_bits=4, iters=1)
    assert mergeq.quantize(mod.TwoInputs(3), "rtn", calib=x, w_bits=4, a_bits=4)(x[:2]).shape == (2, 3)


def test_select_logits_rules():
    t = torch.randn(2, 3)
    HF = type("HF", (), {})
    hf = HF()
    hf.logits, hf.loss = t, torch.tensor(1.0)
    Inception = namedtuple("InceptionOutputs", ["logits", "aux_logits"])
    cases = [(t, "auto"), (hf, "auto"), ({"logits": t, "f": t + 1}, "auto"), ({"out": t, "n": 3}, "auto"),
             ((t, t + 1), "auto"), (Inception(t, t + 1), "auto"), ({"y": t}, "y"), (hf, "logits"), ((t + 1, t), 1),
             (t, 5)]
    for out, select in cases:
        assert select_logits(out, select) is t
    for out, select, msg in [({"a": t, "b": t}, "auto", r"a dict with keys \['a', 'b'\]"), ((t,), 2, "a tuple of 1"),
                             ({"a": t}, "b", "selector 'b'"), (3, "auto", "returned a int")]:
        with pytest.raises(ModelError, match=msg):
            select_logits(out, select)
    with pytest.raises(ModelError, match="output selector must be"):
        LogitsAdapter(nn.Linear(2, 2), 1.5)


def test_weights_from_safetensors(nets, tmp_path):
    torch.manual_seed(0)
    ref = build_model("resnet8", 10, width=8)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    spec = {"name": "resnet8", "kwargs": {"width": 8}, "weights": str(path)}
    loaded = resolve_model(spec, 10)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ref.state_dict().items())
    with pytest.raises(ModelError, match=r"shape mismatches: fc\.weight \(10, 32\) vs model \(4, 32\), fc\.bias"):
        resolve_model(spec, 4)
    new_head = resolve_model({**spec, "ignore": ["fc.*"]}, 4)  # a pretrained body, a fresh 4-class head
    assert torch.equal(new_head.conv1.weight, ref.conv1.weight) and new_head.fc.weight.shape == (4, 32)
    state = dict(ref.state_dict())
    state.pop("bn1.running_mean")
    state["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError, match=r"missing keys: bn1\.running_mean; unexpected keys: extra\.weight"):
        resolve_model({**spec, "weights": str(tmp_path / "bad.safetensors")}, 10)
    resolved = resolved_spec(spec)
    assert resolved["weights"] == str(path.resolve()) and len(resolved["weights_sha256"]) == 64
    assert torch.equal(resolve_model(resolved, 10).fc.weight, ref.fc.weight)
    save_file({k: v.contiguous() * 2 for k, v in ref.state_dict().items()}, str(path))
    with pytest.raises(ModelError, match="changed since the config was written"):
        resolve_model(resolved, 10)
    with pytest.raises(ModelError, match="changed since the config was written"):  # resolving again keeps the hash
        resolve_model(resolved_spec(resolved), 10)
    for weights, msg in [(tmp_path / "w.pt", "only .safetensors"), (tmp_path / "none.safetensors", "does not exist")]:
        with pytest.raises(ModelError, match=msg):
            resolve_model({**spec, "weights": str(weights)}, 10)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        resolve_model({**spec, "weights": str(tmp_path / "junk.safetensors")}, 10)
    with pytest.raises(ModelError, match="model.weights is not set"):
        resolve_model({"name": "resnet8", "ignore": ["fc.*"]}, 10)


def test_spec_errors(nets):
    x = torch.randn(2, 3, 8, 8)
    cases = [({"name": "resnet8", "builder": f"{nets}:make"}, ModelError, "exactly one of name"),
             ({}, ModelError, "exactly one of name"),
             ({"builder": "no_colon"}, ModelError, "package.module:function"),
             ({"builder": "no_such_module_xyz:make"}, ModelError, "cannot import module 'no_such_module_xyz'"),
             ({"builder": f"{nets}:nope"}, ModelError, "has no attribute 'nope'"),
             ({"builder": f"{nets}:not_a_model"}, ModelError, "returned str, not an nn.Module"),
             ({"name": "resnet9"}, ValueError, "unknown architecture 'resnet9'"),
             ({"name": "resnet8", "width": 8}, ConfigError, r"^model\.width: unknown key"),
             ({"name": "resnet8", "output": 1.5}, ConfigError, r"^model\.output: expected str or int or null"),
             ({"builder": f"{nets}:make"}, ModelError, r"returns a dict with keys \['logits', 'features'\], not a "
                                                       r"logits tensor: set model.output"),
             ({"builder": f"{nets}:make_fixed", "output": "auto"}, ModelError, r"shape \(2, 5\).*expected \(2, 3\)")]
    for spec, err, msg in cases:
        with pytest.raises(err, match=msg):
            resolve_model(spec, 3, example_input=x)
    torch.manual_seed(0)
    a = resolve_model("resnet8", 10)
    torch.manual_seed(0)
    b = build_model("resnet8", 10).state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.state_dict().items())


def test_torchvision_and_timm_names():
    x = torch.randn(2, 3, 32, 32)
    for package, name in (("torchvision", "torchvision:resnet18"), ("timm", "timm:resnet18")):
        try:
            __import__(package)
        except Exception:  # not installed, or built for another torch (the CPU wheel here)
            with pytest.raises(ModelError, match=f"needs {package} built for torch"):
                resolve_model(name, 7)
            continue
        model = resolve_model(name, 7, example_input=x)
        assert model(x).shape == (2, 7)
