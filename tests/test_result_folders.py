"""Issue 31, items 2 and 7 (nested seeds) and two of its vague lines: result folders that cannot lose or
mix results. Cells are faked (no training), so each test takes a second or two."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import yaml

from mergeq.cli import main
from mergeq.errors import MergeqError
from mergeq.eval.intervals import paired_diff_ci
from mergeq.experiments import bench
from mergeq.experiments.bench import run_grid
from mergeq.experiments.compare import compare, markdown, summarize

from .conftest import TINY, tiny_config

BASE = {**TINY, "ptq": {**TINY["ptq"], "methods": ["rtn", "brecq"], "bits": ["W3A3"]}}


def fake_cell(cfg):
    """A cell without training: its hmean says which method, seed and PTQ seed made it."""
    method, seed, ptq = cfg.ptq.methods[0], cfg.runtime.seed, cfg.runtime.seeds.ptq or 0
    acc = {d: 0.5 for d in cfg.data.targets}
    hmean = 0.5 + 0.1 * seed + 0.01 * ptq + (0.02 if method == "brecq" else 0.0)
    return {"benchmark": "digits", "method": method, "experts": acc, "merged": {**acc, "hmean": hmean},
            "fp_merged": {**acc, "hmean": 0.9 + 0.01 * seed}, "seconds": 0.0, "config": cfg.to_dict()}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """compute_cell faked; returns the path of a config file of the tiny grid."""
    monkeypatch.setattr(bench, "compute_cell", fake_cell)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "runtime": {**BASE["runtime"], "cache_dir": str(tmp_path / "cache")}}))
    return path


def _one_line(capsys, argv: list[str], match: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err
    return err


def _files(folder) -> dict:
    """Every file in ``folder`` but the lock files, with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


def _compare(config, out, *args) -> list[str]:
    return ["compare", "--config", str(config), "--out", str(out), "--quiet", *args]


def _cli(command: str, config, out) -> list[str]:
    if command in ("barrier", "surface"):
        return [command, "--config", str(config), "--bits", "W3A3", "--out", str(out), "--quiet"]
    return _compare(config, out) if command == "compare" else [command, "--config", str(config), "--out", str(out),
                                                                "--quiet"]


@pytest.mark.parametrize("there, command", [("run", "compare"), ("bench", "compare"), ("compare", "run"),
                                            ("compare", "bench"), ("run", "barrier"), ("barrier", "surface"),
                                            ("tta", "pmq")])
def test_a_folder_of_another_command_is_refused_in_one_line_and_kept(fake, tmp_path, capsys, there, command):
    """The issue's case: `compare --out` a `run` folder replaced its results.json, config.yaml and
    results.md with rc 0; a run into a compare folder said mergeq "did not write" them."""
    out = tmp_path / "x"
    if there == "compare":
        assert main(_compare(fake, out)) == 0
        capsys.readouterr()
        entries = "results.json, config.yaml, results.md, grid/"
    elif there == "bench":
        assert main(["bench", str(fake), "--out", str(out), "--quiet"]) == 0
        capsys.readouterr()
        entries = "results.json, config.yaml, results.md, cells/"
    elif there == "barrier":
        out.mkdir()
        (out / "config.yaml").write_text(tiny_config(tmp_path).to_yaml())
        (out / "barrier.json").write_text('{"paths": {}}')
        entries = "config.yaml, barrier.json"
    else:
        out.mkdir()
        row = {"stream": "balanced"} if there == "tta" else {"method": "rtn", "w_bits": 3, "a_bits": 3}
        (out / "results.json").write_text(json.dumps({"experiment": there, "rows": [row]}))
        (out / "config.yaml").write_text(tiny_config(tmp_path).to_yaml())
        (out / "results.md").write_text("# a table\n")
        entries = "results.json, config.yaml, results.md"
    before = _files(out)
    err = _one_line(capsys, _cli(command, fake, out), f"{out} holds a `{there}` result ({entries}); {command} "
                    "writes its own folder: choose another --out")
    assert "did not write" not in err
    assert _files(out) == before and not (tmp_path / "cache").exists()  # nothing trained, nothing changed


def test_cells_are_checked_against_their_file_and_the_grid(fake, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(_compare(fake, out, "--seeds", "2")) == 0
    capsys.readouterr()
    cells, grid = out / "grid" / "cells", out / "grid"
    seed0, seed1 = cells / "uci+noisy__seed0__W3A3__rtn.json", cells / "uci+noisy__seed1__W3A3__rtn.json"
    assert "settings_sha256" in json.loads(seed0.read_text())
    kept = seed0.read_text()
    shutil.copy(seed1, seed0)  # a cell file copied over another seed's
    _one_line(capsys, _compare(fake, out, "--seeds", "2"), f"bench cell {seed0} holds the cell "
              "'uci+noisy__seed1__W3A3__rtn', not 'uci+noisy__seed0__W3A3__rtn' (key, seed differ; copied from "
              "another cell's file?): delete the file to recompute the cell")
    seed0.write_text(kept)
    # grid/config.yaml and the config results.json records, both edited: the cells' own settings disagree
    for name in ("config.yaml", "results.json"):
        (grid / name).write_text((grid / name).read_text().replace("calib_size: 64", "calib_size: 48")
                                 .replace('"calib_size": 64', '"calib_size": 48'))
    before = _files(out)
    _one_line(capsys, _compare(fake, out, "--seeds", "2", "--calib-size", "48"),
              f"was computed with other settings than the grid's {grid / 'config.yaml'} (ptq.calib_size: 64 in the "
              "cell, 48 in the grid): delete the cell file to recompute it, or run with the settings it was computed "
              "with")
    assert _files(out) == before


def test_a_second_compare_with_other_settings_is_refused_and_mixes_nothing(fake, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(_compare(fake, out, "--calib-size", "8")) == 0
    capsys.readouterr()
    before = _files(out)
    _one_line(capsys, _compare(fake, out, "--calib-size", "48"), "holds results of a run with other settings "
              "(ptq.calib_size differ) [ptq.calib_size: 8 recorded, 48 now]; its rows would be mixed with new ones: "
              "use another --out")
    # several settings: each named with both values, a long value cut short, the line still one line
    err = _one_line(capsys, _compare(fake, out, "--calib-size", "48", "--set", "adapt.source.epochs=2", "--ptq-seeds",
                                     "40"), "(adapt.source.epochs, ptq.calib_size, grid.ptq_seeds differ) ")
    assert "[adapt.source.epochs: 1 recorded, 2 now; ptq.calib_size: 8 recorded, 48 now; grid.ptq_seeds: None " \
           "recorded, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16... now]; its rows" in err, err
    assert _files(out) == before


def _blocked_cell(started: threading.Event, release: threading.Event):
    def cell(cfg):
        started.set()
        assert release.wait(20)
        return fake_cell(cfg)

    return cell


def test_concurrent_grids_with_other_settings_never_mix(monkeypatch, tmp_path):
    """A second grid started while the first computes its first cell (no cell file yet) used to
    overwrite config.yaml and add its cells to the first's; now it is refused at once."""
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(bench, "compute_cell", _blocked_cell(started, release))
    out, cfg = tmp_path / "grid", tiny_config(tmp_path, {"ptq.bits": ["W3A3"], "ptq.calib_size": 8})
    first = threading.Thread(target=run_grid, args=(cfg, out))
    first.start()
    try:
        assert started.wait(20)
        with pytest.raises(MergeqError, match=r"ptq\.calib_size differ"):
            run_grid(cfg.updated({"ptq.calib_size": 48}), out)
    finally:
        release.set()
        first.join(20)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["config"]["ptq"]["calib_size"] for r in rows] == [8]


def test_a_second_compare_waits_for_the_lock_then_is_refused(monkeypatch, tmp_path, caplog):
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(bench, "compute_cell", _blocked_cell(started, release))
    out, cfg = tmp_path / "x", tiny_config(tmp_path, {"ptq.bits": ["W3A3"]})
    errors = []
    first = threading.Thread(target=compare, args=(cfg, out))
    second = threading.Thread(target=lambda: errors.extend(_raised(compare, cfg.updated({"ptq.calib_size": 48}), out)))
    first.start()
    try:
        assert started.wait(20)
        second.start()
        deadline = time.time() + 20
        while "being written by another mergeq process" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
        assert second.is_alive() and not (out / "results.json").exists()
    finally:
        release.set()
        first.join(20)
        second.join(20)
    assert len(errors) == 1 and "ptq.calib_size differ" in str(errors[0])
    assert json.loads((out / "results.json").read_text())["units"] == [[0, None]]


def _raised(fn, *args) -> list[Exception]:
    try:
        fn(*args)
    except MergeqError as e:
        return [e]
    return []


def test_a_cell_without_fp_merged_is_named(fake, monkeypatch, tmp_path, capsys):
    """A cell written before issue 21 (no full-precision merge) gave `mergeq compare: error: fp_merged`."""
    monkeypatch.setattr(bench, "compute_cell", lambda cfg: {k: v for k, v in fake_cell(cfg).items()
                                                            if k != "fp_merged"})
    out = tmp_path / "x"
    _one_line(capsys, _compare(fake, out), f"bench cell {out / 'grid' / 'cells' / 'uci+noisy__seed0__W3A3__rtn.json'} "
              "holds no fp_merged.hmean (compare reports the merged and the full-precision merged hmean): delete the "
              "file to recompute the cell")


def _nested_cells() -> list[dict]:
    return [{"method": m, "bits": "W3A3", "seed": s, "ptq_seed": p, "merged": {"hmean": h},
             "fp_merged": {"hmean": 0.9 + 0.01 * s + 0.001 * p}}
            for s, p, hs in [(0, 0, (0.60, 0.62)), (0, 1, (0.64, 0.70)), (1, 0, (0.50, 0.51)), (1, 1, (0.52, 0.55))]
            for m, h in zip(("hdrq", "qdrop"), hs)]


def test_nested_seeds_use_the_outer_seed_as_the_unit():
    """`--seeds 2 --ptq-seeds 2` reported "4 PTQ seeds" and took the four as independent."""
    res = {"benchmark": "digits", "targets": ["uci", "noisy"], "confidence": 0.95,
           **summarize(_nested_cells(), ["hdrq", "qdrop"], ["W3A3"])}
    assert res["unit"] == "seed" and res["units"] == [[0, None], [1, None]] and res["ptq_seeds_averaged"] == [0, 1]
    hdrq = res["bits"]["W3A3"]["methods"]["hdrq"]
    assert hdrq["n"] == 2 and [v[:2] for v in hdrq["values"]] == [[0, None], [1, None]]
    assert [v[2] for v in hdrq["values"]] == pytest.approx([62.0, 51.0])  # each seed: the mean of its PTQ seeds
    pair = res["bits"]["W3A3"]["pairs"][0]
    ci = paired_diff_ci([62.0, 51.0], [66.0, 53.0], bounds=(-100, 100))  # the two seeds' means, not four values
    assert (pair["n"], pair["mean"], pair["low"], pair["high"]) == pytest.approx((2, ci.estimate, ci.low, ci.high))
    assert res["fp_merged"]["n"] == 2 and res["fp_merged"]["mean"] == pytest.approx(90.55)
    md = markdown(res)
    assert md.split("\n")[0] == "# hdrq, qdrop on digits (uci, noisy): 2 seeds, each the mean over 2 PTQ seeds"
    assert "so they are not independent" in md and "every interval is over the 2 seeds" in md
    assert "over 2 paired seeds" in res["sentences"][0]
    # PTQ seeds on one seed: the unit stays the PTQ seed, and the table says what it covers
    one = summarize([c for c in _nested_cells() if c["seed"] == 0], ["hdrq", "qdrop"], ["W3A3"])
    assert one["unit"] == "PTQ seed" and one["units"] == [[0, 0], [0, 1]] and one["ptq_seeds_averaged"] is None
    assert "not other source models or experts" in markdown({"benchmark": "digits", "targets": ["uci"],
                                                              "confidence": 0.95, **one})


def test_nested_seeds_end_to_end(fake, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(_compare(fake, out, "--seeds", "2", "--ptq-seeds", "2")) == 0
    printed = capsys.readouterr().out
    assert "2 seeds, each the mean over 2 PTQ seeds" in printed and "4 PTQ seeds" not in printed
    res = json.loads((out / "results.json").read_text())
    assert res["unit"] == "seed" and res["units"] == [[0, None], [1, None]]
    # fake_cell: hmean 0.5 + 0.1 seed + 0.01 ptq (+0.02 brecq): seed means 50.5 and 60.5 for rtn
    assert [v[2] for v in res["bits"]["W3A3"]["methods"]["rtn"]["values"]] == pytest.approx([50.5, 60.5])
    assert len(list((out / "grid" / "cells").iterdir())) == 8
