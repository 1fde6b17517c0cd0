"""mergeq compare: a grid of methods x bits x seeds through bench, then intervals and one sentence per pair;
runtime.seeds: one source of randomness at a time."""
import json
import re

import pytest
import torch
import yaml

from mergeq.cli import main
from mergeq.eval.intervals import MIN_VERDICT_SEEDS, signed
from mergeq.experiments import Pool, bench, load_config
from mergeq.experiments.compare import markdown, summarize

from .conftest import TINY, tiny_config

SENTENCE = re.compile(r"^- ((\w+) vs (\w+) at (\w+): ([+-]\d+\.\d) points, 95% CI \[([+-]\d+\.\d), ([+-]\d+\.\d)\] "
                      r"over (\d+) paired seeds: (.*))$", re.M)


def _config_file(tmp_path, cache):
    cfg = {**TINY, "ptq": {**TINY["ptq"], "options": {"brecq": {"iters": 2}}},
           "runtime": {**TINY["runtime"], "cache_dir": str(cache)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_sentences(printed: str, res: dict) -> int:
    """Every printed sentence is in results.json and quotes its pair's interval as printed there."""
    found = SENTENCE.findall(printed)
    assert [f[0] for f in found] == res["sentences"]
    for sentence, a, b, bits, est, low, high, n, words in found:
        pair = next(p for p in res["bits"][bits]["pairs"] if (p["a"], p["b"]) == (a, b))
        assert (est, low, high, int(n)) == (signed(pair["mean"]), signed(pair["low"]), signed(pair["high"]), pair["n"])
        if int(n) < MIN_VERDICT_SEEDS:  # issue 31: no verdict from fewer paired seeds
            assert words.startswith(f"too few for a verdict (it needs at least {MIN_VERDICT_SEEDS} paired seeds")
            continue
        assert words == ("no detectable difference" if float(low) <= 0 <= float(high) else
                         f"{a} is {'better' if float(low) > 0 else 'worse'} by {abs(float(est)):.1f} points")
    return len(found)


def test_compare_help_names_its_seed_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--seeds N_OR_LIST" in text and "--ptq-seeds N_OR_LIST" in text and "--methods" in text


@pytest.mark.slow  # trains the models of a second seed: 10-20 s on 2 cores
def test_compare_two_seeds_prints_sentences_that_match_results_json(tmp_path, model_cache, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(_config_file(tmp_path, model_cache)), "--methods", "rtn,brecq",
            "--bits", "W3A3", "--seeds", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["units"] == [[0, None], [1, None]] and res["unit"] == "seed"
    rtn = res["bits"]["W3A3"]["methods"]["rtn"]
    files = (out / "grid" / "cells").iterdir()
    cells = {(c["method"], c["seed"]): c for c in (json.loads(f.read_text()) for f in files)}
    assert rtn["values"] == [[s, None, 100 * cells[("rtn", s)]["merged"]["hmean"]] for s in (0, 1)]
    assert rtn["low"] <= rtn["mean"] <= rtn["high"] and rtn["n"] == 2
    assert _check_sentences(printed, res) == 1
    assert (out / "compare.png").stat().st_size > 10_000 and "](compare.png)" in printed
    recorded = load_config(out / "config.yaml")
    assert recorded.grid.seeds == [0, 1] and recorded.ptq.methods == ["rtn", "brecq"]


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_ptq_seeds_on_fixed_experts_sentences_and_resume(tmp_path, model_cache, capsys, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(_config_file(tmp_path, model_cache)), "--methods", "rtn,brecq",
            "--bits", "W3A3", "--set", "merge.recalibrate=act", "--ptq-seeds", "0,3", "--out", str(out), "--quiet"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["units"] == [[0, 0], [0, 3]] and res["unit"] == "PTQ seed"
    # the same experts under every PTQ seed (`act` leaves the full-precision merge alone; `bn` would
    # re-estimate it on each PTQ seed's calibration draw, runtime.seeds.calib)
    assert res["fp_merged"]["low"] == res["fp_merged"]["high"]
    cell = json.loads((out / "grid" / "cells" / "uci+noisy__seed0__ptq3__W3A3__brecq.json").read_text())
    assert cell["config"]["runtime"]["seeds"] | {"split": None} == {
        "split": None, "source": None, "shot": None, "ptq": 3, "calib": 3}
    printed = capsys.readouterr().out
    assert _check_sentences(printed, res) == 1 and "](compare.png)" in printed
    assert load_config(out / "config.yaml").grid.ptq_seeds == [0, 3]
    # rerun: every cell is reused, the same sentences
    monkeypatch.setattr(bench, "compute_cell", lambda cfg: pytest.fail("a finished cell was recomputed"))
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["sentences"] == res["sentences"]
    # the same folder without PTQ seeds: other cells, refused before any work
    assert main([*args[:-5], "--out", str(out), "--quiet"]) == 2
    assert "grid.ptq_seeds" in capsys.readouterr().err


def _cells(values: dict[str, list[float]]) -> list[dict]:
    return [{"method": m, "bits": "W3A3", "seed": s, "ptq_seed": None, "merged": {"hmean": h / 100},
             "fp_merged": {"hmean": 0.9}} for m, hs in values.items() for s, h in enumerate(hs)]


def test_one_seed_says_no_interval_can_be_given():
    res = {"benchmark": "digits", "targets": ["uci"], "unit": "seed", "confidence": 0.95,
           **summarize(_cells({"hdrq": [80.0], "qdrop": [78.0]}), ["hdrq", "qdrop"], ["W3A3"])}
    md = markdown(res)
    assert "| hdrq | 80.0 (n=1, no interval) |" in md and "| hdrq − qdrop | +2.0 (no interval) |" in md
    assert "One seed: no interval can be given" in md
    assert res["sentences"] == ["hdrq vs qdrop at W3A3: +2.0 points on 1 paired seed: no interval can be given "
                                "(it needs at least 2 paired seeds), so no difference can be claimed"]


def test_pairs_use_the_seeds_both_methods_have():
    cells = _cells({"hdrq": [80.0, 82.0, 84.0], "qdrop": [79.0, 80.0]})
    res = summarize(cells, ["hdrq", "qdrop"], ["W3A3"])
    pair = res["bits"]["W3A3"]["pairs"][0]
    assert pair["n"] == 2 and pair["mean"] == pytest.approx(1.5)
    assert res["bits"]["W3A3"]["methods"]["hdrq"]["n"] == 3
    # differences 1 and 2: Student's interval 1.5 ± 12.706 * 0.5 (t with 1 degree of freedom), p = 0.205
    assert pair["low"] == pytest.approx(1.5 - 6.353, abs=1e-3) and pair["high"] == pytest.approx(7.853, abs=1e-3)
    assert pair["p"] == pytest.approx(0.2048, abs=1e-3)


def test_each_seed_of_runtime_seeds_changes_only_its_models(model_cache):
    base = Pool(tiny_config(model_cache))
    calib = base.calib("uci", 16)
    assert torch.equal(calib, base.bench.targets["uci"].train.tensors[0][:16])
    drawn = Pool(tiny_config(model_cache, {"runtime.seeds.calib": 4}))
    assert drawn.calib("uci", 16).shape == calib.shape and not torch.equal(drawn.calib("uci", 16), calib)
    assert torch.equal(drawn.calib("uci", 16), drawn.calib("uci", 16))
    shot = Pool(tiny_config(model_cache, {"runtime.seeds.shot": 5}))
    assert shot._source_key == base._source_key  # the same source model, other experts
    assert Pool(tiny_config(model_cache, {"runtime.seeds.shot": 0}))._source_key == base._source_key
    for what in ("source", "split"):
        assert Pool(tiny_config(model_cache, {f"runtime.seeds.{what}": 5}))._source_key != base._source_key
    theirs, ours = shot.expert("uci").state_dict(), base.expert("uci").state_dict()
    assert any(not torch.equal(theirs[k], ours[k]) for k in ours)


def test_variance_sources_moves_one_source_at_a_time():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "variance_sources.py"
    spec = importlib.util.spec_from_file_location("variance_sources", path)
    vs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs)
    cfg = tiny_config("c", {"runtime.seed": 3})
    plan = vs.points(cfg, 2)
    assert "merge" not in plan  # float rounding draws nothing
    assert plan["shot"] == [(3, {}), (4, {"runtime.seeds.shot": 4})]  # the base point is shared
    assert plan["calib"] == [(3, {"runtime.seeds.calib": 3}), (4, {"runtime.seeds.calib": 4})]
    assert plan["threads"] == [(1, {}), (2, {"runtime.threads": 2})]  # TINY: one thread
    noisy = vs.points(cfg.updated({"merge.rounding": "noise", "merge.rounding_options": {"seed": 7}}), 2)
    assert noisy["merge"] == [(7, {}), (8, {"merge.rounding_options.seed": 8})]


def test_prediction_intervals_bound_a_new_seed():
    """Each method and each pair carries where one new seed lands: mean ± t·s·sqrt(1 + 1/n)."""
    cells = _cells({"hdrq": [80.0, 82.0, 84.0], "qdrop": [79.0, 80.0, 84.0]})
    res = {"benchmark": "digits", "targets": ["uci"], "unit": "seed", "confidence": 0.95,
           **summarize(cells, ["hdrq", "qdrop"], ["W3A3"])}
    hdrq = res["bits"]["W3A3"]["methods"]["hdrq"]["predict"]
    half = 4.302653 * 2.0 * (1 + 1 / 3) ** 0.5  # t(0.975, 2 dof) · s · sqrt(1 + 1/n)
    assert hdrq["low"] == pytest.approx(82 - half, abs=1e-4) and hdrq["high"] == pytest.approx(82 + half, abs=1e-4)
    pair = res["bits"]["W3A3"]["pairs"][0]["predict"]  # differences 1, 2, 0
    assert pair["low"] == pytest.approx(1 - 4.302653 * 1.0 * (4 / 3) ** 0.5, abs=1e-4)
    assert f"| hdrq | [{82 - half:.1f}, {82 + half:.1f}] |" in markdown(res)
