"""Bad input to the command line and to YAML configs: a one-line error naming the thing, exit
status 2, and nothing trained first (issue 15). Written against the CLI, not the internals."""
import pytest
import torch
import yaml

from mergeq.cli import main
from mergeq.errors import ConfigError
from mergeq.models import build_model
from mergeq.zoo import save_model


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
    ("methods: rtn", "methods must be list[str], got 'rtn'"),
    ('seed: "seven"', "seed must be int, got 'seven'"),
    ("threads: true", "threads must be int | None, got True"),
    ("source: {nosuch: 1}", "source has unknown key(s) ['nosuch']"),
    ("shot: {epochs: many}", "shot.epochs must be int"),
    ("ptq_options: [1, 2]", "ptq_options must be dict"),
    ("ptq_options: {hdrq: {bogus: 1}}", "ptq_options.hdrq has unknown key(s) ['bogus']"),
    ("ptq_options: {qdrop: {iters: ten}}", "ptq_options.qdrop.iters must be int"),
    ("ptq_options: {rtn: {iters: 3}}", "ptq_options.rtn has unknown key(s) ['iters']"),
    ("ptq_options: {nosuch: {}}", "unknown PTQ method 'nosuch'"),
    ("num_classes: ten", "unknown key(s) ['num_classes']"),
    ("arch_kwargs: [16]", "arch_kwargs must be"),
    ("arch_kwargs: {width: wide}", "arch_kwargs {'width': 'wide'} do not fit arch 'resnet8'"),
    ("arch_kwargs: {depth: 3}", "arch_kwargs {'depth': 3} do not fit"),
    ("calib_size: -5", "calib_size must be a positive integer"),
    ("calib_size: 0", "calib_size must be a positive integer"),
    ("merge_options: {bogus: 1}", "merge_options (rounding float) has unknown key(s) ['bogus']"),
    ("rounding: noise-ties\nmerge_options: {samples: 0}", "samples must be at least 1"),
    ("rounding: noise\nmerge_options: {select: block}", "merge_options (rounding noise).select must be"),
    ("methods: [rtn, rtn]", "methods lists 'rtn' twice"),
    ("bits: [W4A4, w4a4]", "bits lists 'W4A4' twice"),
    ("targets: []", "targets must list at least one entry"),
    ("device: gpu0", "device must name a torch device"),
    ("- a\n- b", "must hold a YAML mapping"),
    ("methods: [rtn\n", "is not valid YAML"),
])
def test_bad_yaml_config_is_named_before_training(tmp_path, capsys, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    cache = tmp_path / "cache"
    _fails(capsys, ["run", "--config", str(path), "--out", str(tmp_path / "out"), "--cache-dir", str(cache),
                    "--quiet"], match, cache)


@pytest.mark.parametrize("flags, match", [
    (["--rounding", "noise-ties", "--samples", "0"], "samples must be at least 1"),
    (["--rounding", "noise", "--samples", "-5"], "samples must be at least 1"),
    (["--samples", "-5"], "(rounding float) has unknown key(s) ['samples']"),
    (["--samples", "30"], "(rounding float) has unknown key(s) ['samples']"),
    (["--threads", "0"], "threads must be a positive integer"),
    (["--first-last-bits", "9"], "first_last_bits must be an integer from 2 to 8"),
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
    err = _fails(capsys, ["run", "--out", str(out), "--preset", "quick", "--targets", "uci", "--cache-dir",
                          str(tmp_path / "cache"), "--quiet"], "holds results of a run with other settings")
    assert "tta" in err
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
           "samples must be at least 1")
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
                 "--threads", "3", "--out", str(tmp_path / "q.safetensors"), "--quiet"]) == 0
    assert calls[:1] == [3]


def test_barrier_points_below_two_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["barrier", "--points", "1", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "must be at least 2" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: seven")
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
    err = _fails(capsys, ["tta", "--out", str(out), "--preset", "quick", "--cache-dir", str(cache), "--quiet"],
                 "holds results of a run with other settings", cache)
    assert "run" in err and "tta" in err
    afile = tmp_path / "f"
    afile.write_text("")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"methods": ["rtn"], "bits": ["W4A4"], "target_sets": [["uci"]], "seeds": [0],
                                    "cache_dir": str(cache)}))
    _fails(capsys, ["bench", str(grid), "--out", str(afile), "--quiet"], "is an existing file", cache)


def test_quantize_takes_the_presets_options_for_any_method(tmp_path, monkeypatch, capsys, two_checkpoints):
    """Found with issue 15: brecq/adaround/ttaq got no preset options (20,000 iterations at --preset quick)."""
    import mergeq.ptq

    seen = {}

    def fake_quantize(model, method, **kw):
        seen.update(method=method, **kw)
        raise ValueError("stop here")

    monkeypatch.setattr(mergeq.ptq, "quantize", fake_quantize)
    argv = ["quantize", "--model", two_checkpoints[0], "--method", "brecq", "--preset", "quick",
            "--out", str(tmp_path / "q.safetensors"), "--quiet"]
    _fails(capsys, argv, "names no domain to calibrate on: pass --domain")
    _fails(capsys, [*argv, "--domain", "uci"], "stop here")
    assert seen["method"] == "brecq" and seen["iters"] == 30 and seen["calib_size"] == 128
