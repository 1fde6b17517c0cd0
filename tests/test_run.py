"""``mergeq run`` end to end on the tiny digits config: files, the written config reruns, resume, steps."""
import json
import statistics

import pytest
import torch
import yaml

from mergeq import evaluate, merge
from mergeq.cli import main
from mergeq.errors import MergeqError
from mergeq.experiments import Pool, load_config, resolve, run
from mergeq.experiments.store import RunDir
from mergeq.sysinfo import cpu

from .conftest import tiny_config


def _same(rows_a, rows_b):
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}  # noqa: E731
    return [strip(r) for r in rows_a] == [strip(r) for r in rows_b]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = tiny_config(model_cache)
    return out, cfg, run(cfg, out)


def test_results_schema_and_files(tiny_run):
    out, _, res = tiny_run
    assert {"results.json", "results.md", "config.yaml", "hmean_vs_bits.png", "merged_vs_experts.png"} <= {
        p.name for p in out.iterdir()}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps({"experiment": "run", **res}))
    assert on_disk["benchmark"] == "digits" and on_disk["targets"] == ["uci", "noisy"] and on_disk["seed"] == 0
    assert on_disk["machine"]["cpu"] == cpu() and on_disk["machine"]["versions"]["torch"] == torch.__version__
    assert set(on_disk["fp"]["merged"]) == {"uci", "noisy", "hmean"}
    assert [(r["method"], r["w_bits"], r["a_bits"]) for r in on_disk["rows"]] == [("rtn", 8, 8), ("rtn", 3, 3)]
    for r in on_disk["rows"]:
        assert all(0.0 <= v <= 1.0 for v in [*r["experts"].values(), *r["merged"].values()])
        assert r["ptq"]["uci"]["changed_codes"] == 0.0 and "recon_loss" not in r["ptq"]["uci"]  # RTN: nothing moved
        assert r["ptq"]["uci"]["calib_size"] == 64  # the calibration inputs used: ptq.calib_size (uci has more)
    assert "](hmean_vs_bits.png)" in (out / "results.md").read_text()
    assert "](merged_vs_experts.png)" in (out / "results.md").read_text()
    assert all((out / png).read_bytes()[:4] == b"\x89PNG" for png in ("hmean_vs_bits.png", "merged_vs_experts.png"))
    assert on_disk["steps"] == {"source": 62, "shot": {"uci": 28, "noisy": 15}}  # one pass each (tiny config)


def test_written_config_is_resolved_and_reruns_to_the_same_numbers(tiny_run, tmp_path):
    out, cfg, res = tiny_run
    text = (out / "config.yaml").read_text()
    again = load_config(out / "config.yaml")
    assert again.to_yaml() == text and resolve(again).to_yaml() == text  # resolving a resolved config: the identity
    assert again.adapt.source.epochs == 1 and again.ptq.options["rtn"] == {} and again.data.targets == ["uci", "noisy"]
    assert main(["run", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    res2 = json.loads((tmp_path / "again" / "results.json").read_text())
    assert _same(res2["rows"], res["rows"]) and res2["fp"] == res["fp"]
    assert (tmp_path / "again" / "config.yaml").read_text() == text


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_resume_keeps_every_row_and_refuses_other_settings(tiny_run, tmp_path):
    """Issue 15: results.json once went from 4 rows to 1 when --out held another run's rows."""
    import shutil

    out0, cfg, res = tiny_run
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    assert run(cfg, out)["rows"] == res["rows"]  # the same run again: nothing recomputed
    more = run(cfg.updated({"ptq.bits": ["W4A4"]}), out)
    assert [(r["method"], r["w_bits"], r["a_bits"]) for r in more["rows"]] == [("rtn", 8, 8), ("rtn", 3, 3),
                                                                              ("rtn", 4, 4)]
    assert more["rows"][:2] == res["rows"]  # the earlier rows, untouched
    assert json.loads((out / "results.json").read_text())["rows"] == more["rows"]
    assert yaml.safe_load((out / "config.yaml").read_text())["ptq"]["bits"] == ["W8A8", "W3A3", "W4A4"]
    before = (out / "results.json").read_text()
    for change, name in [({"runtime.seed": 1}, "runtime.seed"), ({"ptq.calib_size": 32}, "ptq.calib_size"),
                         ({"ptq.step_method": "absmax"}, "ptq.step_method"), ({"merge.rounding": "nearest"},
                                                                                "merge.rounding")]:
        with pytest.raises(MergeqError, match=f"other settings .*{name}"):
            run(cfg.updated(change), out)
    with pytest.raises(MergeqError, match=r"holds a `run` result \(results.json, config.yaml, results.md\); pmq "
                                          "writes its own folder"), RunDir(out, "pmq").locked():
        pass
    assert (out / "results.json").read_text() == before


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_an_edited_config_yaml_cannot_relabel_the_rows(tiny_run, tmp_path):
    """Issue 24: a rerun of an edited config.yaml into the same --out kept the old rows and
    labelled every row with the new settings. results.json records the config its rows were
    computed with, and a settings hash per row."""
    import shutil

    out0, cfg, res = tiny_run
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"] == yaml.safe_load((out / "config.yaml").read_text())
    assert all(len(r["settings_sha256"]) == 64 for r in on_disk["rows"])
    before = (out / "results.json").read_text()
    for key, value in (("calib_size", 32), ("step_method", "absmax"), ("first_last_bits", 4)):
        edited = yaml.safe_load((out0 / "config.yaml").read_text())
        edited["ptq"][key] = value
        (out / "config.yaml").write_text(yaml.safe_dump(edited))
        with pytest.raises(MergeqError, match=f"other settings \\(ptq.{key} differ\\).*use another --out"):
            run(load_config(out / "config.yaml"), out)
    assert main(["run", "--config", str(out / "config.yaml"), "--out", str(out), "--quiet"]) == 2
    assert (out / "results.json").read_text() == before
    results = json.loads(before)  # results.json's config edited too: the rows' hashes refuse it
    results["config"]["ptq"]["calib_size"] = 32
    (out / "results.json").write_text(json.dumps(results))
    (out / "config.yaml").write_text(yaml.safe_dump(results["config"]))
    with pytest.raises(MergeqError, match=r"row \('rtn', 8, 8\) was computed with other settings"):
        run(load_config(out / "config.yaml"), out)


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_a_second_run_into_the_same_out_waits_and_keeps_both_rows(tiny_run, tmp_path, caplog):
    """Issue 24: two `mergeq run --out R` at once (other bits) both exited 0 and results.json
    kept only the last writer's rows. run (and pmq, tta) hold a lock on --out, as bench does."""
    import logging
    import shutil
    import threading

    from mergeq.io import file_lock

    out0, cfg, res = tiny_run
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    second = {}
    with file_lock(out / ".locks" / "out.lock"):  # the first run, still writing
        worker = threading.Thread(target=lambda: second.update(run(cfg.updated({"ptq.bits": ["W4A4"]}), out)))
        with caplog.at_level(logging.WARNING, logger="mergeq.experiments.store"):
            worker.start()
            worker.join(1.0)
        assert worker.is_alive() and "being written by another mergeq process" in caplog.text
        assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    worker.join()
    keys = [(r["method"], r["w_bits"], r["a_bits"]) for r in second["rows"]]
    assert keys == [("rtn", 8, 8), ("rtn", 3, 3), ("rtn", 4, 4)]
    assert json.loads((out / "results.json").read_text())["rows"] == second["rows"]


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_repeated_sampling_merges_are_averaged(model_cache):
    pool = Pool(tiny_config(model_cache, {"merge.rounding": "noise", "merge.rounding_options": {"samples": 2},
                                          "merge.repeats": 3}))
    q = list(pool.quantize_experts("rtn", pool.qconfig((3, 3))).values())
    m = pool.merge_and_evaluate(q)
    rep = m["repeats"]
    assert rep["seeds"] == [0, 1, 2] and len(rep["hmeans"]) == 3
    assert m["hmean"] == pytest.approx(sum(rep["hmeans"]) / 3)
    one = [evaluate(pool.deployed(pool.recalibrate(merge(q, rounding="noise", samples=2, seed=s), q)),
                    pool.tests)["hmean"] for s in (0, 1, 2)]  # evaluated as deployed (issue 31)
    assert one == rep["hmeans"]  # each repeat is the merge with its own seed (then recalibrated: merge.recalibrate)
    assert rep["std"] == pytest.approx(statistics.stdev(one)) and rep["std"] > 0


def test_cli_rejects_bad_bits_and_methods(tmp_path, capsys):
    assert main(["run", "--bits", "W9A4", "--out", str(tmp_path)]) == 2
    assert "from 2 to 8" in capsys.readouterr().err
    assert main(["run", "--methods", "nope", "--targets", "uci", "--preset", "quick", "--out", str(tmp_path),
                 "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 2
    assert "ptq.methods[0]: unknown PTQ method 'nope'" in capsys.readouterr().err


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_step_commands_round_trip_and_write_their_config(tiny_run, model_cache, tmp_path, capsys):
    from mergeq.checkpoint import model_from_checkpoint
    from mergeq.nn import quant_modules

    common = ["--config", str(tiny_run[0] / "config.yaml"), "--quiet"]
    source = tmp_path / "source.safetensors"
    assert main(["train-source", *common, "--out", str(source)]) == 0  # the cached source, saved
    qpaths = []
    for d in ("uci", "noisy"):
        expert, q = tmp_path / f"{d}.safetensors", tmp_path / f"{d}-w4a4.safetensors"
        assert main(["adapt", *common, "--source", str(source), "--domain", d, "--out", str(expert)]) == 0
        assert main(["quantize", *common, "--model", str(expert), "--method", "rtn", "--bits", "W4A4",
                     "--out", str(q)]) == 0
        qpaths.append(q)
    model, meta = model_from_checkpoint(qpaths[0])
    assert meta["quant_layers"] and meta["bits"] == "W4A4" and meta["data"]["kind"] == "digits"
    for _, m in quant_modules(model):
        assert torch.equal(m.weight, m.int_weight() * m.w_step)
    written = load_config(tmp_path / "uci-w4a4.config.yaml")
    assert written.ptq.methods == ["rtn"] and written.ptq.bits == ["W4A4"]
    again = tmp_path / "again.safetensors"  # the written config reruns the step
    assert main(["quantize", "--config", str(tmp_path / "uci-w4a4.config.yaml"), "--model",
                 str(tmp_path / "uci.safetensors"), "--out", str(again), "--quiet"]) == 0
    assert torch.equal(model_from_checkpoint(again)[0].conv1.weight, model.conv1.weight)
    merged_path = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, qpaths), "--rounding", "noise", "--samples", "3", "--out", str(merged_path)]) == 0
    report = json.loads(merged_path.with_suffix(".report.json").read_text())
    assert set(report["accuracy"]) == {"uci", "noisy", "hmean"} and report["options"]["samples"] == 3
    assert report["recalibrate"] == "bn+act"  # the preset's, on each domain's calibration images
    printed = capsys.readouterr().out.splitlines()[-1]  # percentages, like run's
    assert printed == (f"merged 2 models -> {merged_path}; accuracy: " + ", ".join(
        f"{d} {100 * report['accuracy'][d]:.1f}%" for d in ("uci", "noisy", "hmean")))
    merged, _ = model_from_checkpoint(merged_path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(merged(x), model_from_checkpoint(merged_path)[0](x))
    assert load_config(tmp_path / "merged.config.yaml").merge.rounding == "noise"
    # the expert adapted by the step command is the pool's cached expert: same data, seed and settings
    assert torch.equal(model_from_checkpoint(tmp_path / "uci.safetensors")[0].conv1.weight,
                       Pool(tiny_run[1]).expert("uci").conv1.weight)


def test_threads_are_validated_and_applied(model_cache):
    from mergeq.cli import build_parser, load_cli_config

    with pytest.raises(MergeqError, match="runtime.threads: must be at least 1"):
        tiny_config(model_cache, {"runtime.threads": 0})
    assert load_cli_config(build_parser().parse_args(["run", "--threads", "1"])).runtime.threads == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Pool(tiny_config(model_cache))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # spawns worker processes that import torch (CI runs it)
def test_rows_in_worker_processes_equal_rows_computed_in_process(model_cache, tmp_path):
    """runtime.workers: rows run side by side in spawned processes, with threads // workers torch
    threads each (1 here, as in-process), give the same numbers, recorded in plan order."""
    changes = {"ptq.methods": ["qdrop", "rtn"], "ptq.bits": ["W4A4", "W3A3"], "ptq.options": {"qdrop": {"iters": 4}}}
    seq = run(tiny_config(model_cache, changes), tmp_path / "seq")
    par = run(tiny_config(model_cache, {**changes, "runtime.workers": 2}), tmp_path / "par")
    keys = [(r["method"], r["w_bits"], r["a_bits"]) for r in par["rows"]]
    assert keys == [("qdrop", 4, 4), ("rtn", 4, 4), ("qdrop", 3, 3), ("rtn", 3, 3)]
    assert _same(par["rows"], seq["rows"]) and par["fp"] == seq["fp"]
    assert seq["compute"] == {"threads": 1, "workers": 1, "row_threads": 1}  # null: one worker per torch thread
    assert par["compute"] == {"threads": 1, "workers": 2, "row_threads": 1}
    assert yaml.safe_load((tmp_path / "par" / "config.yaml").read_text())["runtime"]["workers"] == 2
    with pytest.raises(MergeqError, match="runtime.workers: must be at least 1"):
        tiny_config(model_cache, {"runtime.workers": 0})


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_a_quick_run_on_a_non_default_device_string(tmp_path):
    """``runtime.device: cpu:0`` (not the default ``cpu``) through source training, SHOT, RTN, the
    noise rounding and evaluation, models trained afresh: a tensor made on the default device, or a
    device compared by its string, fails here."""
    changes = {"runtime.device": "cpu:0", "ptq.bits": ["W8A8"], "merge.rounding": "noise",
               "merge.rounding_options": {"samples": 2}}
    res = run(tiny_config(tmp_path / "cache", changes), tmp_path / "out")
    assert [(r["method"], r["w_bits"]) for r in res["rows"]] == [("rtn", 8)]
    assert all(0.0 <= v <= 1.0 for v in res["rows"][0]["merged"].values())
    assert load_config(tmp_path / "out" / "config.yaml").runtime.device == "cpu:0"


def test_rows_are_merged_with_the_recalibration_the_config_names(tiny_run, tmp_path):
    """merge.recalibrate (preset quick: bn+act) is what the rows and the FP reference were merged
    with: the row equals the pool's merge recalibrated by hand, and `none` gives the plain merge."""
    from mergeq.eval import evaluate
    from mergeq.experiments.pool import Pool
    from mergeq.merge import merge
    from mergeq.merge.recalibrate import recalibrate

    out, cfg, res = tiny_run
    assert yaml.safe_load((out / "config.yaml").read_text())["merge"]["recalibrate"] == "bn+act"
    pool = Pool(cfg)
    q = pool.quantize_experts("rtn", pool.qconfig((3, 3)))
    experts = [q[d] for d in pool.targets]
    calib = [pool.calib(d) for d in pool.targets]
    # the reported model is the deployed one: the integer graph's requantizations included (issue 31)
    assert res["rows"][1]["merged"] == evaluate(
        pool.deployed(recalibrate(merge(experts), experts, calib, "bn+act")), pool.tests)
    assert Pool(cfg.updated({"merge.recalibrate": "none"})).merge_and_evaluate(experts) == evaluate(
        pool.deployed(merge(experts)), pool.tests)
    fp = [pool.fold(pool.expert(d)) for d in pool.targets]
    assert res["fp"]["merged"] == evaluate(recalibrate(merge(fp), fp, calib, "bn"), pool.tests)


def test_results_of_a_data_free_merge_are_not_resumed_with_recalibration(tiny_run, tmp_path):
    """A results folder written before merge.recalibrate existed merged without it: resuming it
    with the new default is refused, naming the key; with recalibrate none it resumes."""
    import shutil

    out0, cfg, res = tiny_run
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    on_disk = json.loads((out / "results.json").read_text())
    on_disk["config"]["merge"].pop("recalibrate")
    for r in on_disk["rows"]:
        r.pop("settings_sha256")  # rows written before issue 24 carry none
    (out / "results.json").write_text(json.dumps(on_disk))
    (out / "config.yaml").write_text(yaml.safe_dump(on_disk["config"]))
    with pytest.raises(MergeqError, match=r"other settings \(merge.recalibrate differ\)"):
        run(cfg, out)
    assert run(cfg.updated({"merge.recalibrate": "none"}), out)["rows"] == on_disk["rows"]  # nothing recomputed
