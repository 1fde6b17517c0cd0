"""Checkpoints and the model cache lose nothing: one file per checkpoint, written atomically,
verified on read; a bad cache entry is rebuilt, a swapped one detected (issue 15, data loss)."""
import hashlib
import json
import logging
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from mergeq import checkpoint
from mergeq import io as mio
from mergeq.checkpoint import model_from_checkpoint, save_model
from mergeq.cli import main
from mergeq.errors import CheckpointError
from mergeq.experiments import pool as pool_module
from mergeq.io import META_DIGEST_KEY, META_KEY, load_checkpoint, save_checkpoint
from mergeq.models import build_model
from mergeq.ptq import quantize
from mergeq.quant import QuantConfig

from .conftest import tiny_config

META = {"arch": "resnet8", "arch_kwargs": {"width": 8}, "num_classes": 10}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet8", 10, width=8).eval()


def _legacy(path, state, meta) -> None:
    """A checkpoint in the earlier two-file form: safetensors + JSON sidecar."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt", "mergeq": "1"})
    path.with_suffix(".json").write_text(json.dumps(meta))


def _rewrite_meta(path, digest: bool = True, **changes) -> None:
    """Edit a one-file checkpoint's header metadata: as a forger would (``digest``: the metadata's
    digest recomputed, so the checks of its content are what refuses it), or carelessly."""
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    text = json.dumps({**json.loads(header[META_KEY]), **changes})
    header = {**header, META_KEY: text}
    if digest:
        header[META_DIGEST_KEY] = hashlib.sha256(text.encode()).hexdigest()
    path.write_bytes(st_save(tensors, metadata=header))


def test_out_ending_in_json_keeps_the_weights(tmp_path):
    """`--out merged.json`: the metadata once overwrote the weights it described, exit 0."""
    paths = []
    for i in range(2):
        paths.append(save_model(_model(i), tmp_path / f"e{i}.safetensors", META))
    out = tmp_path / "merged.json"
    assert main(["merge", *map(str, paths), "--out", str(out)]) == 0
    merged, meta = model_from_checkpoint(out)
    assert meta["role"] == "merged"
    expected = (_model(0).conv1.weight + _model(1).conv1.weight) / 2
    assert torch.allclose(merged.conv1.weight, expected)
    report = json.loads((tmp_path / "merged.json.report.json").read_text())
    assert report["method"] == "average"  # issue 24: m.json.*
    # checkpoints without data: the preset's recalibration is skipped, and the record says so
    assert report["recalibrate"] == "none"
    assert yaml.safe_load((tmp_path / "merged.json.config.yaml").read_text())["merge"]["recalibrate"] == "none"


def test_merge_recalibration_asked_for_without_data_is_refused(tmp_path, capsys):
    paths = [save_model(_model(i), tmp_path / f"e{i}.safetensors", META) for i in range(2)]
    out = tmp_path / "m.safetensors"
    assert main(["merge", *map(str, paths), "--set", "merge.recalibrate=bn", "--out", str(out)]) == 2
    assert "merge.recalibrate bn re-estimates the merge on each expert's calibration images, but the " \
           "checkpoints do not name their data and domains: pass --set merge.recalibrate=none" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_crash_between_writes_leaves_old_or_new_checkpoint(tmp_path, monkeypatch, crash_at):
    path = tmp_path / "m.safetensors"
    save_checkpoint({"w": torch.zeros(4)}, path, {"v": "old"})
    calls = []
    real = os.replace

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise OSError("injected crash")
        return real(src, dst)

    monkeypatch.setattr(mio.os, "replace", crashing_replace)
    try:
        save_checkpoint({"w": torch.ones(4)}, path, {"v": "new"})
    except OSError:
        pass
    monkeypatch.undo()
    tensors, meta = load_checkpoint(path)
    assert (meta["v"], float(tensors["w"][0])) in {("old", 0.0), ("new", 1.0)}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_digest_catches_changed_tensor_bytes(tmp_path):
    path = save_checkpoint({"w": torch.arange(64, dtype=torch.float32)}, tmp_path / "m.safetensors", {})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_earlier_two_file_checkpoints_still_load(tmp_path):
    model = _model()
    path = tmp_path / "old.safetensors"
    _legacy(path, model.state_dict(), META)
    loaded, meta = model_from_checkpoint(path)
    assert meta == META and torch.equal(loaded.conv1.weight, model.conv1.weight)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_get_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        ckpt = save_checkpoint({"w": torch.zeros(1)}, tmp_path / "m.safetensors", {})
        text = mio.write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    for p in (ckpt, text):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask


# --- the model cache -------------------------------------------------------------------------

def _pool(tmp_path, monkeypatch, calls):
    """A pool of the tiny config (width 8) whose training is faked (a call list instead)."""
    pool = pool_module.Pool(tiny_config(tmp_path / "cache", {"model.kwargs": {"width": 8}}))
    domain_of = {id(t.train): d for d, t in pool.bench.targets.items()}

    def fake_train(model, data, cfg, seed, device, progress):
        calls.append("source")
        return model

    def fake_shot(source, data, cfg, seed, device, progress):
        calls.append(domain_of[id(data)])
        return _model(seed=len(calls))

    monkeypatch.setattr(pool_module, "train_source", fake_train)
    monkeypatch.setattr(pool_module, "shot", fake_shot)
    return pool


def _fresh(pool):
    """The same pool with nothing held in memory (what a second run sees)."""
    pool._source, pool._experts = None, {}
    return pool


def test_truncated_cache_entry_is_rebuilt_with_a_log_line(tmp_path, monkeypatch, caplog):
    calls = []
    pool = _pool(tmp_path, monkeypatch, calls)
    first = pool.source
    path = next((tmp_path / "cache").glob("source-*.safetensors"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a crash (or full disk) of an earlier writer
    with caplog.at_level(logging.WARNING, logger="mergeq.experiments.pool"):
        again = _fresh(pool).source
    assert calls == ["source", "source"]
    assert "rebuilding cache entry" in caplog.text and path.name in caplog.text
    assert torch.equal(first.conv1.weight, again.conv1.weight)
    _fresh(pool).source  # the rebuilt entry is good: reused
    assert calls == ["source", "source"]


def test_swapped_cache_entry_is_detected(tmp_path, monkeypatch, caplog):
    calls = []
    pool = _pool(tmp_path, monkeypatch, calls)
    uci, noisy = pool.expert("uci"), pool.expert("noisy")
    cache = tmp_path / "cache"
    uci_path, noisy_path = (next(cache.glob(f"expert-{d}-*.safetensors")) for d in ("uci", "noisy"))
    uci_path.write_bytes(noisy_path.read_bytes())  # another expert's weights under uci's key
    with caplog.at_level(logging.WARNING, logger="mergeq.experiments.pool"):
        again = _fresh(pool).expert("uci")
    assert calls.count("uci") == 2 and "holds another model" in caplog.text
    assert not torch.equal(again.conv1.weight, noisy.conv1.weight)
    assert uci is not again


def test_earlier_two_file_cache_entries_are_reused_and_checked(tmp_path, monkeypatch):
    calls = []
    pool = _pool(tmp_path, monkeypatch, calls)
    pool.source
    path = next((tmp_path / "cache").glob("source-*.safetensors"))
    state, meta = load_checkpoint(path)
    meta.pop("cache_key")
    meta.pop("data")  # entries of that form predate the data spec
    _legacy(path, state, meta)
    _fresh(pool).source
    assert calls == ["source"]  # reused
    _legacy(path, state, {**meta, "domain": "uci"})  # a legacy entry of another model
    _fresh(pool).source
    assert calls == ["source", "source"]


# --- what a checkpoint's metadata may claim ---------------------------------------------------

@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "q.safetensors"
    cfg = QuantConfig(4, None, step_method="absmax")  # the fastest: the checks, not the grid, are tested
    q = quantize(_model(), "rtn", calib=torch.randn(4, 3, 32, 32), config=cfg)
    save_model(q, path, {**META, "bits": "W4A32"})
    return path


def test_bit_width_edited_below_the_stored_codes_is_refused(w4_checkpoint, tmp_path):
    _, meta = model_from_checkpoint(w4_checkpoint)
    name = next(n for n, (w, _) in meta["quant_layers"].items() if w == 4)
    edited = tmp_path / "w2.safetensors"
    edited.write_bytes(w4_checkpoint.read_bytes())
    _rewrite_meta(edited, quant_layers={**meta["quant_layers"], name: [2, None]})
    with pytest.raises(CheckpointError, match=f"{name}.*2 bits"):
        model_from_checkpoint(edited)
    legacy = tmp_path / "legacy.safetensors"  # the case: a sidecar edited from W4 to W2
    state, _ = load_checkpoint(w4_checkpoint)
    _legacy(legacy, state, {**meta, "quant_layers": {k: [2, v[1]] if v[0] == 4 else v
                                                     for k, v in meta["quant_layers"].items()}})
    assert main(["merge", str(legacy), str(legacy), "--out", str(tmp_path / "m.safetensors")]) == 2


@pytest.mark.parametrize("changes, match", [
    ({"quant_layers": {"layer9.conv": [4, 4]}}, "quant_layers names 'layer9.conv'"),
    ({"arch_kwargs": [16]}, "arch_kwargs must be a mapping"),
    ({"arch_kwargs": {"width": "wide"}}, "cannot be built"),
    ({"num_classes": "ten"}, "num_classes must be an integer"),
    ({"quant_layers": {"conv1": "W4"}}, r"quant_layers\['conv1'\]"),
    ({"folded_bn": ["nosuch.bn"]}, "folded_bn names 'nosuch.bn'"),
    ({"folded_bn": ["conv1"]}, "folded_bn names 'conv1', but .* has no such BatchNorm layer"),  # was AttributeError
])
def test_bad_metadata_is_named_before_any_work(w4_checkpoint, tmp_path, changes, match, capsys):
    edited = tmp_path / "e.safetensors"
    edited.write_bytes(w4_checkpoint.read_bytes())
    _rewrite_meta(edited, **changes)
    with pytest.raises(CheckpointError, match=match):
        model_from_checkpoint(edited)
    assert main(["export", "--model", str(edited), "--out", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_edited_metadata_fails_the_digest_and_older_files_still_load(w4_checkpoint, tmp_path, capsys):
    """Issue 24: the header's SHA-256 covers the metadata too (an a_bits edit from 4 to 2 once
    loaded and merged at 15%); files written before that digest still load."""
    edited = tmp_path / "e.safetensors"
    edited.write_bytes(w4_checkpoint.read_bytes())
    _rewrite_meta(edited, digest=False, bits="W2A2")
    with pytest.raises(CheckpointError, match="e.safetensors fails its SHA-256 check: its metadata was edited"):
        model_from_checkpoint(edited)
    assert main(["merge", str(edited), str(edited), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "metadata was edited" in capsys.readouterr().err
    state, meta = load_checkpoint(w4_checkpoint)
    older = tmp_path / "older.safetensors"
    older.write_bytes(st_save(state, metadata={"format": "pt", META_KEY: json.dumps(meta),
                                               "mergeq_sha256": mio.tensor_digest(state)}))
    assert model_from_checkpoint(older)[1] == meta


@pytest.mark.parametrize("value", [float("nan"), -0.5, 0.0, float("inf")])
def test_bad_activation_or_weight_steps_are_refused_at_load(tmp_path, capsys, value):
    """Issue 24: a NaN or negative activation step loaded, merged and exported."""
    cfg = QuantConfig(4, 4, step_method="absmax")
    q = quantize(_model(), "rtn", calib=torch.randn(2, 3, 32, 32), config=cfg)
    state, meta = load_checkpoint(save_model(q, tmp_path / "q.safetensors", META))
    name = next(n for n, (_, a) in meta["quant_layers"].items() if a is not None)
    for key, what in ((f"{name}.act_quant.step", "activation step"), (f"{name}.w_step", "weight step")):
        bad = {**state, key: torch.full_like(state[key], value)}
        path = save_checkpoint(bad, tmp_path / "bad.safetensors", meta)  # a consistent digest: a forged file
        with pytest.raises(CheckpointError, match=f"the {what} of layer '{name}' is .*positive and finite"):
            model_from_checkpoint(path)
    assert main(["export", "--model", str(path), "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "positive and finite" in capsys.readouterr().err


def test_inflated_arch_kwargs_are_refused_from_the_header_before_allocating(tmp_path, monkeypatch):
    path = save_model(_model(), tmp_path / "m.safetensors", META)
    _rewrite_meta(path, arch_kwargs={"width": 512})
    devices = []
    real = checkpoint.build_model
    monkeypatch.setattr(checkpoint, "build_model", lambda *a, **k: devices.append(torch.get_default_device().type)
                        or real(*a, **k))
    with pytest.raises(CheckpointError, match="has shape .* needs"):
        model_from_checkpoint(path)
    assert devices == ["meta"]


# --- your own model: template= and model specs; the format as docs/FORMAT.md describes it -------

def test_any_model_loads_onto_a_template_and_a_spec_model_from_its_metadata(tmp_path):
    from mergeq.deploy import load_packed, save_packed
    from mergeq.nn.output import LogitsAdapter

    from .conftest import tiny_resnet

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    q = quantize(tiny_resnet(), "rtn", calib=x, w_bits=4, a_bits=4)
    path = save_model(q, tmp_path / "own.safetensors", {"num_classes": 10}, template=tiny_resnet())
    with pytest.raises(CheckpointError, match="names no architecture .* template="):
        model_from_checkpoint(path)
    template = tiny_resnet()
    loaded, meta = model_from_checkpoint(path, template=template)
    assert torch.equal(loaded(x), q(x)) and meta["folded_bn"] and meta["quant_layers"]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in template.modules())  # the template is copied, not changed
    with pytest.raises(CheckpointError, match="has shape"):  # a template of another size
        model_from_checkpoint(path, template=torch.nn.Sequential(*list(tiny_resnet(5))))
    # a spec model (here registered, with an output selector) is rebuilt from its metadata alone
    spec = {"name": "resnet8", "kwargs": {"width": 4}, "output": "auto", "weights": None, "ignore": [],
            "weights_sha256": None, "builder": None}
    torch.manual_seed(0)
    wrapped = LogitsAdapter(build_model("resnet8", 10, width=4)).eval()
    qw = quantize(wrapped, "rtn", calib=torch.randn(8, 3, 32, 32), w_bits=4, a_bits=8)
    spath = save_model(qw, tmp_path / "spec.safetensors", {"model": spec, "num_classes": 10})
    again, _ = model_from_checkpoint(spath)
    y = torch.randn(2, 3, 32, 32)
    assert isinstance(again, LogitsAdapter) and torch.equal(again(y), qw(y))
    packed = save_packed(again, tmp_path / "spec.packed.safetensors", model_from_checkpoint(spath)[1])
    assert torch.equal(load_packed(packed)(y), qw(y))


def test_plain_checkpoint_format_as_documented(w4_checkpoint):
    """docs/FORMAT.md: the header's digest and the codes, read with numpy and hashlib only."""
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(w4_checkpoint), framework="np") as f:
        header = f.metadata()
        meta = json.loads(header["mergeq_meta"])
        h = hashlib.sha256()
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            dtype = {"float32": "torch.float32", "bool": "torch.bool"}[str(t.dtype)]
            h.update(f"{name}|{dtype}|{list(t.shape)}|".encode())
            h.update(np.ascontiguousarray(t).tobytes())
        assert h.hexdigest() == header["mergeq_sha256"]
        for name, (w_bits, _) in meta["quant_layers"].items():
            w, step = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.w_step")
            codes = np.round(w / step)
            assert np.array_equal(codes * step, w) and codes.min() >= -2 ** (w_bits - 1) and \
                codes.max() <= 2 ** (w_bits - 1) - 1
