"""Bad input to the command line and to YAML configs: a one-line error naming the thing, exit
status 2, and nothing trained first (issue 15). Written against the CLI, not the internals."""
import pytest
import torch
import yaml

from mergeq.cli import main
from mergeq.errors import ConfigError
from mergeq.models import build_model
from mergeq.checkpoint import save_model


def _fails(capsys, argv, match, cache=None):
    """``mergeq argv`` exits 2 with one line on stderr holding ``match``, and trained nothing."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    if cache is not None:
        assert not cache.exists() or not any(cache.glob("*.safetensors")), "a model was trained first"
    return err


@pytest.mark.parametrize("text, match", [
    ("ptq: {methods: rtn}", "ptq.methods: expected a list, got str 'rtn'"),
    ('runtime: {seed: "seven"}', "runtime.seed: expected int, got str 'seven'"),
    ("runtime: {threads: true}", "runtime.threads: expected int, got bool True"),
    ("adapt: {source: {nosuch: 1}}", "adapt.source.nosuch: unknown key; known: epochs"),
    ("adapt: {shot: {epochs: many}}", "adapt.shot.epochs: expected int"),
    ("ptq: {options: [1, 2]}", "ptq.options: expected a mapping"),
    ("ptq: {options: {hdrq: {bogus: 1}}}", "ptq.options.hdrq.bogus: unknown key; known: iters"),
    ("ptq: {options: {qdrop: {iters: ten}}}", "ptq.options.qdrop.iters: expected int"),
    ("ptq: {options: {qdrop: {iters: 0}}}", "ptq.options.qdrop.iters: must be at least 1, got 0"),
    ("ptq: {options: {rtn: {iters: 3}}}", "ptq.options.rtn.iters: unknown key; known: (none)"),
    ("ptq: {options: {nosuch: {}}}", "ptq.options.nosuch: unknown PTQ method 'nosuch'"),
    ("num_classes: ten", "config.num_classes: unknown key; known: preset, data, model"),
    ("ptq: {nosuch: 1}", "ptq.nosuch: unknown key"),
    ("model: {name: resnet8, kwargs: [16]}", "model.kwargs: expected a mapping"),
    ("model: {name: resnet8, kwargs: {width: wide}}", "model.kwargs: {'width': 'wide'} do not fit model 'resnet8'"),
    ("model: {name: resnet8, kwargs: {depth: 3}}", "model.kwargs: {'depth': 3} do not fit"),
    ("model: {name: resnet9}", "model.name: expected a registered architecture"),
    ("model: {kwargs: {width: 4}}", "model: give exactly one of name"),
    ("model: {builder: no_such_module:make}", "cannot import module 'no_such_module'"),
    ("data: {kind: folder, source: Art}", "data.root: required key is missing"),
    ("data: {kind: folder, root: /no/such/folder, source: Art}", "data root /no/such/folder does not exist"),
    ("data: {kind: imagenet}", "data.kind: expected one of ['digits', 'folder', 'office_home', 'streets', 'segmentation'], got 'imagenet'"),
    ("data: {source: svhn}", "data.source: expected one of mnist"),
    ("ptq: {calib_size: -5}", "ptq.calib_size: must be at least 1"),
    ("ptq: {calib_size: 0}", "ptq.calib_size: must be at least 1"),
    ("merge: {rounding_options: {bogus: 1}}", "merge.rounding_options (rounding float).bogus: unknown key"),
    ("merge: {rounding: noise-ties, rounding_options: {samples: 0}}", "samples: must be at least 1"),
    ("merge: {rounding: noise, rounding_options: {select: block}}",
     "merge.rounding_options (rounding noise).select: expected one of"),
    ("merge: {repeats: 3}", "merge.repeats: 3 merges apply to the sampling roundings"),
    ("merge: {options: {ties: {densty: 0.2}}}", "merge.options.ties.densty: unknown key; known: density"),
    ("ptq: {methods: [rtn, rtn]}", "ptq.methods: lists 'rtn' twice"),
    ("ptq: {bits: [W4A4, w4a4]}", "ptq.bits: lists 'W4A4' twice (as 'w4a4')"),
    ("data: {targets: []}", "data.targets: must list at least one entry"),
    ("runtime: {device: gpu0}", "runtime.device: expected cpu, cpu:N, cuda, cuda:N or mps, got 'gpu0'"),
    ("- a\n- b", "must hold a YAML mapping"),
    ("ptq: {methods: [rtn\n", "is not valid YAML"),
    # the earlier flat form is still read, its keys named by their new paths
    ("methods: rtn", "ptq.methods: expected a list, got str 'rtn'"),
    ("benchmark: office", "benchmark: 'office' of the earlier flat config form"),
    ("ptq_options: {hdrq: {bogus: 1}}", "ptq.options.hdrq.bogus: unknown key"),
])
def test_bad_yaml_config_is_named_before_training(tmp_path, capsys, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    cache = tmp_path / "cache"
    _fails(capsys, ["run", "--config", str(path), "--out", str(tmp_path / "out"), "--cache-dir", str(cache),
                    "--quiet"], match, cache)


@pytest.mark.parametrize("flags, match", [
    (["--rounding", "noise-ties", "--samples", "0"], "samples: must be at least 1"),
    (["--rounding", "noise", "--samples", "-5"], "samples: must be at least 1"),
    (["--samples", "-5"], "(rounding float).samples: unknown key; known: (none)"),
    (["--samples", "30"], "(rounding float).samples: unknown key; known: (none)"),
    (["--rounding", "noise", "--samples", "many"], "(rounding noise).samples: expected int, got str 'many'"),
    (["--repeats", "2"], "merge.repeats: 2 merges apply to the sampling roundings"),
    (["--threads", "0"], "runtime.threads: must be at least 1"),
    (["--first-last-bits", "9"], "ptq.first_last_bits: must be at most 8 (the supported bit widths), got 9"),
    (["--set", "ptq.options.hdrq.iters=ten"], "ptq.options.hdrq.iters: expected int, got str 'ten'"),
    (["--set", "ptq.iters=10"], "ptq.iters: no such config entry"),
    (["--set", "ptq.calib_size"], "expected PATH=VALUE"),
    (["--config", "/no/such.yaml"], "config file /no/such.yaml cannot be read"),
])
def test_bad_run_flags_fail_before_training(tmp_path, capsys, flags, match):
    cache = tmp_path / "cache"
    _fails(capsys, ["run", *flags, "--preset", "quick", "--targets", "uci", "--out", str(tmp_path / "o"),
                    "--cache-dir", str(cache), "--quiet"], match, cache)


def test_run_out_that_cannot_be_a_folder_fails_before_training(tmp_path, capsys):
    cache = tmp_path / "cache"
    afile = tmp_path / "a.txt"
    afile.write_text("keep me")
    common = ["--preset", "quick", "--targets", "uci", "--cache-dir", str(cache), "--quiet"]
    _fails(capsys, ["run", "--out", str(afile), *common], "is an existing file", cache)
    _fails(capsys, ["run", "--out", str(afile / "sub"), *common], "Not a directory", cache)  # unwritable
    _fails(capsys, ["train-source", "--out", str(tmp_path), *common], "is an existing directory", cache)
    _fails(capsys, ["barrier", "--out", str(afile), "--methods", "rtn", *common], "is an existing file", cache)
    assert afile.read_text() == "keep me"


def test_run_into_a_folder_of_another_command_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"rows": [{"stream": "balanced"}]}')
    (out / "config.yaml").write_text(yaml.safe_dump({"run": {}, "tta": {}}))
    _fails(capsys, ["run", "--out", str(out), "--preset", "quick", "--targets", "uci", "--cache-dir",
                    str(tmp_path / "cache"), "--quiet"],
           f"{out} holds a `tta` result (results.json, config.yaml); run writes its own folder: choose another --out")
    (out / "results.json").write_text('{"rows": [')  # a damaged results file is named, never overwritten
    _fails(capsys, ["run", "--out", str(out), "--preset", "quick", "--targets", "uci", "--cache-dir",
                    str(tmp_path / "cache"), "--quiet"], str(out / "results.json"))
    assert (out / "results.json").read_text() == '{"rows": ['


@pytest.fixture
def two_checkpoints(tmp_path):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(str(save_model(build_model("resnet8", 10, width=8), tmp_path / f"e{i}.safetensors",
                                    {"arch": "resnet8", "arch_kwargs": {"width": 8}, "num_classes": 10})))
    return paths


def test_merge_flag_errors(tmp_path, capsys, two_checkpoints):
    out = str(tmp_path / "m.safetensors")
    _fails(capsys, ["merge", *two_checkpoints, "--method", "ties", "--samples", "3", "--base", two_checkpoints[0],
                    "--out", out], "--rounding and --samples apply to --method average")
    _fails(capsys, ["merge", *two_checkpoints, "--rounding", "noise", "--samples", "0", "--out", out],
           "samples: must be at least 1")
    _fails(capsys, ["merge", *two_checkpoints, "--out", out, "--report", out], "is the checkpoint path")
    _fails(capsys, ["merge", *two_checkpoints, "--out", str(tmp_path)], "is an existing directory")
    _fails(capsys, ["merge", two_checkpoints[0], str(tmp_path / "nope.safetensors"), "--out", out], "does not exist")
    _fails(capsys, ["merge", *two_checkpoints, "--method", "nosuch", "--out", out], "unknown merge method 'nosuch'")
    _fails(capsys, ["export", "--model", two_checkpoints[0], "--out", str(tmp_path)], "is an existing directory")


def test_quantize_refuses_a_source_of_another_architecture_before_any_work(tmp_path, capsys, two_checkpoints):
    other = save_model(build_model("resnet8", 10, width=4), tmp_path / "src4.safetensors",
                       {"arch": "resnet8", "arch_kwargs": {"width": 4}, "num_classes": 10})
    _fails(capsys, ["quantize", "--model", two_checkpoints[0], "--method", "hdrq", "--source", str(other),
                    "--domain", "uci", "--preset", "quick", "--out", str(tmp_path / "q.safetensors"), "--quiet"],
           "the source model does not match the model to quantize")


def test_threads_apply_to_step_commands(tmp_path, monkeypatch, two_checkpoints):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["quantize", "--model", two_checkpoints[0], "--method", "rtn", "--domain", "uci", "--preset", "quick",
                 "--threads", "1", "--out", str(tmp_path / "q.safetensors"), "--quiet"]) == 0
    assert calls[:1] == [1]


def test_barrier_points_below_two_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["barrier", "--points", "1", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "must be at least 2" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text("runtime: {seed: seven}")
    argv = ["run", "--config", str(path), "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="seed"):
        main(["--debug", *argv])
    monkeypatch.setenv("MERGEQ_DEBUG", "1")
    with pytest.raises(ConfigError, match="seed"):
        main(argv)


def test_tta_and_bench_check_their_out_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"rows": [{"method": "rtn", "w_bits": 4, "a_bits": 4}]}')
    (out / "config.yaml").write_text(yaml.safe_dump({"benchmark": "digits", "methods": ["rtn"]}))
    cache = tmp_path / "cache"
    _fails(capsys, ["tta", "--out", str(out), "--preset", "quick", "--cache-dir", str(cache), "--quiet"],
           "holds a `run` result (results.json, config.yaml); tta writes its own folder", cache)
    afile = tmp_path / "f"
    afile.write_text("")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"methods": ["rtn"], "bits": ["W4A4"], "target_sets": [["uci"]], "seeds": [0],
                                    "cache_dir": str(cache)}))
    _fails(capsys, ["bench", str(grid), "--out", str(afile), "--quiet"], "is an existing file", cache)


def test_quantize_takes_the_presets_options_for_any_method(tmp_path, monkeypatch, capsys, two_checkpoints):
    """Found with issue 15: brecq/adaround/ttaq got no preset options (20,000 iterations at --preset quick)."""
    from mergeq.experiments import steps

    seen = {}

    def fake_quantize(model, method, **kw):
        seen.update(method=method, **kw)
        raise ValueError("stop here")

    monkeypatch.setattr(steps, "quantize", fake_quantize)
    argv = ["quantize", "--model", two_checkpoints[0], "--method", "brecq", "--preset", "quick",
            "--out", str(tmp_path / "q.safetensors"), "--quiet"]
    _fails(capsys, argv, "names no domain to calibrate on: pass --domain")
    _fails(capsys, [*argv, "--domain", "uci"], "stop here")
    assert seen["method"] == "brecq" and seen["iters"] == 100 and seen["calib_size"] == 128


def test_no_progress_bars_in_a_log_file_but_one_line_per_cell(monkeypatch, caplog, capsys):
    """Progress bars only on a terminal: in a log file or pipe no bar is drawn (tqdm's ``disable=None``)
    and bench logs each cell. A bar once wrote thousands of \\r updates into redirected logs."""
    import argparse

    from mergeq import cli
    from mergeq.adapt.source import step_bar

    bar = step_bar(True, 5, "source")  # pytest captures stderr: not a terminal
    for _ in range(5):
        bar.update()
    bar.close()
    assert bar.disable and "source" not in capsys.readouterr().err
    progress, close = cli._cell_bar(argparse.Namespace(quiet=False))
    with caplog.at_level("INFO", logger="mergeq.bench"):
        progress(0, 2, "running uci__seed0__W4A4__rtn")
        progress(1, 2, "uci__seed0__W4A4__rtn done, hmean 80.0%")
    close()
    assert caplog.messages == ["cells 0/2: running uci__seed0__W4A4__rtn",
                               "cells 1/2: uci__seed0__W4A4__rtn done, hmean 80.0%"]


def test_set_data_kind_takes_effect_before_the_other_data_keys(tmp_path, capsys):
    """``--set data.kind=folder`` decides which ``data.*`` keys the other ``--set``s may name, wherever
    it stands among them; they were checked against the default (digits) kind's keys, so the kind
    switch itself was refused (``data.kind: expected one of ['digits']``)."""
    from mergeq.cli import build_parser, load_cli_config

    from .test_data_spec import make_tree

    tree = make_tree(tmp_path / "office")
    folder = ["--set", "data.kind=folder", "--set", f"data.root={tree}", "--set", "data.source=Real_World",
              "--set", "data.image_size=16", "--set", f"runtime.cache_dir={tmp_path / 'cache'}"]
    assert main(["data", *folder, "--quiet", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert "Real_World: train" in capsys.readouterr().out
    # every command's --set: the kind named last still decides; office_home, a second kind of FolderData
    for command in (["run"], ["pmq"], ["tta"], ["bench"], ["compare"], ["train-source"]):
        args = build_parser().parse_args([*command, *folder[2:], "--set", "data.kind=office_home", "--out", "o"])
        cfg = load_cli_config(args)
        assert (cfg.data.kind, cfg.data.root, cfg.data.image_size) == ("office_home", str(tree), 16), command
    # a key the chosen kind lacks is still refused, in one line naming it (and before any work)
    _fails(capsys, ["data", *folder, "--set", "data.domains={}", "--out", str(tmp_path / "g2.png")],
           "data.domains: no such config entry for data.kind 'folder'")
    _fails(capsys, ["run", "--set", "data.image_size=16", "--preset", "quick", "--out", str(tmp_path / "o")],
           "data.image_size: no such config entry for data.kind 'digits'")
    _fails(capsys, ["run", "--set", "data.kind=nosuch", "--preset", "quick", "--out", str(tmp_path / "o")],
           "data.kind: expected one of ['digits', 'folder', 'office_home', 'streets', 'segmentation'], got 'nosuch'")
    _fails(capsys, ["data", *folder, "--set", "data.image_size=big", "--out", str(tmp_path / "g3.png")],
           "data.image_size: expected int, got str 'big'")
