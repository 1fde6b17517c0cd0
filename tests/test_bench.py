"""mergeq bench: a two-cell grid writes CSV and Markdown, and a rerun finishes only missing cells."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergeq.cli import main
from mergeq.data import TARGET_DOMAINS

from mergeq.errors import MergeqError
from mergeq.experiments import bench, load_config
from mergeq.experiments.bench import cells_of, run_grid

from .conftest import TINY

GRID = {**TINY, "ptq": {**TINY["ptq"], "bits": ["W8A8", "W4A4"]},
        "grid": {"target_sets": [list(TARGET_DOMAINS[:2])], "seeds": [0]}}


def _grid_file(path, grid, cache):
    path.write_text(yaml.safe_dump({**grid, "runtime": {**grid.get("runtime", {}), "cache_dir": str(cache)}}))
    return path


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401

        return True
    except Exception:
        return False


@pytest.fixture
def grid(tmp_path, model_cache):
    return _grid_file(tmp_path / "grid.yaml", GRID, model_cache)


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_two_cell_grid_and_resume(grid, tmp_path, monkeypatch):
    out = tmp_path / "out"
    events = []
    results = run_grid(load_config(grid), out, progress=lambda i, n, text: events.append((i, n, text)))
    assert [r["bits"] for r in results] == ["W8A8", "W4A4"]
    # each cell is announced when it starts, then reported done with a time estimate
    assert [(i, n) for i, n, _ in events] == [(0, 2), (1, 2), (1, 2), (2, 2)]
    assert events[0][2].startswith("running ") and "W8A8" in events[0][2]
    assert "done" in events[1][2] and "s left" in events[1][2] and "W4A4" in events[2][2]
    csv_lines = (out / "bench.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("targets,seed,bits,method")
    md = (out / "results.md").read_text()
    assert "| rtn |" in md and "W4A4" in md and "**" in md and "](hmean_vs_bits.png)" in md
    assert (out / "hmean_vs_bits.png").stat().st_size > 0
    fp = results[0]["fp_merged"]["hmean"]
    assert results[1]["fp_merged"]["hmean"] == fp and f"| full precision (merged) | {100 * fp:.1f} ± 0.0 |" in md
    # a cell's recorded config is a run config: rerun, it gives the cell's numbers
    cell_cfg = tmp_path / "cell.yaml"
    cell_cfg.write_text(yaml.safe_dump(results[1]["config"]))
    assert main(["run", "--config", str(cell_cfg), "--out", str(tmp_path / "cell-run"), "--quiet"]) == 0
    row = json.loads((tmp_path / "cell-run" / "results.json").read_text())["rows"][0]
    assert row["merged"] == results[1]["merged"] and row["experts"] == results[1]["experts"]
    # "kill" the grid after its first cell: remove the second cell's file, then rerun
    cells = sorted((out / "cells").glob("*.json"))
    second = next(p for p in cells if "W4A4" in p.name)
    first = next(p for p in cells if "W8A8" in p.name)
    first_text = first.read_text()
    second.unlink()
    ran = []
    real = bench.run_cell
    monkeypatch.setattr(bench, "run_cell", lambda b, c, o, *a: ran.append(c.key) or real(b, c, o, *a))
    again = run_grid(load_config(grid), out)
    assert ran == [json.loads(second.read_text())["key"]]
    assert first.read_text() == first_text
    assert [r["merged"] for r in again] == [r["merged"] for r in results]


def test_grid_errors_and_the_earlier_flat_grid_files(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({**GRID, "ptq": {"bits": ["W1A4"]}}))
    with pytest.raises(ValueError, match=r"ptq\.bits\[0\]: .*from 2 to 8"):
        load_config(bad)
    flat = tmp_path / "flat.yaml"  # the form of benchmarks/grids before issue 16
    flat.write_text(yaml.safe_dump({"preset": "quick", "ptq_options": {"hdrq": {"iters": 100}}, "methods": ["rtn"],
                                    "bits": ["W4A4"], "target_sets": [["uci"]], "seeds": [0, 1]}))
    cfg = load_config(flat)
    assert [c.key for c in cells_of(cfg)] == ["uci__seed0__W4A4__rtn", "uci__seed1__W4A4__rtn"]
    assert cfg.ptq.options == {"hdrq": {"iters": 100}}


needs_ray = pytest.mark.skipif(not _ray_available(), reason="Ray is not installed (pip install 'mergeq[ray]')")


@needs_ray
@pytest.mark.slow  # starting Ray takes 14 s of the default run's 3 minutes on 2 cores (CI runs it)
def test_ray_executor_runs_a_cell_like_the_local_one(tmp_path, model_cache):
    """The fast Ray check: one cell on a local Ray instance = the same cell in-process."""
    one = _grid_file(tmp_path / "one.yaml", {**GRID, "ptq": {**GRID["ptq"], "bits": ["W4A4"]}}, model_cache)
    local = run_grid(load_config(one), tmp_path / "local")
    remote = run_grid(load_config(one), tmp_path / "ray", executor="ray")
    assert len(remote) == 1 and remote[0]["merged"] == local[0]["merged"]
    assert remote[0]["experts"] == local[0]["experts"]


@needs_ray
@pytest.mark.slow  # Ray workers for every cell: 10-60 s on 2 cores, up to minutes on slower CPUs (CI runs it)
def test_ray_executor_matches_local(grid, tmp_path):
    local = run_grid(load_config(grid), tmp_path / "local")
    remote = run_grid(load_config(grid), tmp_path / "ray", executor="ray")
    assert [r["merged"] for r in remote] == [r["merged"] for r in local]
    assert [r["experts"] for r in remote] == [r["experts"] for r in local]


@pytest.mark.parametrize("recorded", ["config.yaml", "grid.yaml"])
def test_resume_refuses_other_settings(grid, tmp_path, recorded):
    """An interrupted grid (cells, no results.json yet; grid.yaml: written before issue 16) of other settings."""
    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    cell = out / "cells" / "uci+mnistm__seed0__W8A8__rtn.json"
    cell.write_text("{}")
    other = load_config(grid).updated({"ptq.calib_size": 32}).to_yaml() if recorded == "config.yaml" else \
        yaml.safe_dump({**yaml.safe_load(grid.read_text()), "calib_size": 32})  # the earlier flat form
    (out / recorded).write_text(other)
    with pytest.raises(ValueError, match="ptq.calib_size differ"):
        run_grid(load_config(grid), out)
    assert [p.name for p in (out / "cells").iterdir()] == [cell.name] and cell.read_text() == "{}"
    (out / recorded).unlink()
    with pytest.raises(ValueError, match="holds bench cells but no config.yaml"):
        run_grid(load_config(grid), out)


# --- concurrent runs, damaged cells, dead parents (issue 15) -----------------------------------

FAKE_CELL = '''
import os, sys, time
from pathlib import Path
import mergeq.experiments.bench

def fake_cell(cfg):
    """Stands in for training: a cell takes CELL_SECONDS and says which process computed it."""
    marks = Path(os.environ["MARKS"])
    marks.mkdir(exist_ok=True)
    (marks / f"{os.getpid()}-{cfg.ptq.bits[0]}").touch()
    started, t0 = os.environ.get("STARTED"), time.time()
    while started and len(list(Path(started).iterdir())) < 2 and time.time() < t0 + 60:
        time.sleep(0.1)  # the other bench process is up: a busy machine cannot let one run take every cell
    time.sleep(float(os.environ.get("CELL_SECONDS", "0")))
    acc = {d: 0.5 for d in cfg.data.targets}
    return {"method": cfg.ptq.methods[0], "experts": acc, "merged": {**acc, "hmean": 0.5}, "seconds": 0.0,
            "fp_merged": {**acc, "hmean": 0.5}}
'''

SIX_BITS = ["W8A8", "W7A7", "W6A6", "W5A5", "W4A4", "W3A3"]


def _fake_grid(tmp_path, bits=SIX_BITS):
    return _grid_file(tmp_path / "grid.yaml", {**GRID, "ptq": {**GRID["ptq"], "bits": bits}}, tmp_path / "cache")


def _marks(folder):
    return [p.name.split("-", 1) for p in folder.iterdir()] if folder.exists() else []


def test_cell_locked_by_another_process_is_not_computed_twice(tmp_path, monkeypatch):
    """In process: a cell whose lock another holder has is put off, then its result is read."""
    import threading

    from mergeq.io import file_lock

    namespace = {}
    exec(FAKE_CELL, namespace)
    monkeypatch.setattr(bench, "compute_cell", namespace["fake_cell"])
    monkeypatch.setenv("MARKS", str(tmp_path / "marks"))
    grid, out = load_config(_fake_grid(tmp_path, ["W8A8", "W4A4"])), tmp_path / "out"
    cells = cells_of(grid)
    held, release = threading.Event(), threading.Event()

    def other_process():  # holds W8A8's lock, "computes" it, writes it, releases
        with file_lock(out / ".locks" / f"{cells[0].key}.lock"):
            held.set()
            release.wait(10)
            bench.write_json(out / "cells" / f"{cells[0].key}.json",
                             {"key": cells[0].key, "targets": list(cells[0].targets), "seed": 0, "bits": "W8A8",
                              "method": "rtn", "experts": {"uci": 1.0, "mnistm": 1.0},
                              "merged": {"uci": 1.0, "mnistm": 1.0, "hmean": 1.0}, "seconds": 0.0})

    t = threading.Thread(target=other_process)
    t.start()
    held.wait(10)
    events = []
    results = run_grid(grid, out, progress=lambda i, n, text: events.append(text) or (
        "W4A4" in text and "done" in text and release.set()))
    t.join()
    assert [tag for _, tag in _marks(tmp_path / "marks")] == ["W4A4"]  # W8A8 was not computed here
    assert results[0]["merged"]["hmean"] == 1.0 and results[1]["merged"]["hmean"] == 0.5


def _python(code: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two bench processes, each importing torch and training: CI runs it
def test_two_bench_processes_on_one_out_split_the_cells(tmp_path):
    grid, out, marks = _fake_grid(tmp_path), tmp_path / "out", tmp_path / "marks"
    code = FAKE_CELL + "\n".join(["", "mergeq.experiments.bench.compute_cell = fake_cell",
                                   "from mergeq.cli import main", "Path(os.environ['STARTED'], str(os.getpid())).touch()",
                                   "sys.exit(main(sys.argv[1:]))"])
    (tmp_path / "started").mkdir()
    env = {"MARKS": str(marks), "CELL_SECONDS": "1", "STARTED": str(tmp_path / "started")}
    cmd = ["bench", str(grid), "--out", str(out), "--quiet"]
    first = _python(code, env, *cmd)
    deadline = time.time() + 60
    while not _marks(marks) and time.time() < deadline:  # the first one is inside its first cell
        time.sleep(0.1)
    second = _python(code, env, *cmd)
    for p in (first, second):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    done = [tag for _, tag in _marks(marks)]
    assert sorted(done) == sorted(SIX_BITS)  # every cell computed exactly once, by one of them
    assert len({pid for pid, _ in _marks(marks)}) == 2  # and both did some of the work
    assert len((out / "bench.csv").read_text().strip().splitlines()) == 1 + len(SIX_BITS)


def test_damaged_cell_file_is_named(grid, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cells = cells_of(load_config(grid))
    (out / "cells").mkdir(parents=True)
    bad = out / "cells" / f"{cells[0].key}.json"
    bad.write_text('{"key": "trunc')
    (out / "config.yaml").write_text(load_config(grid).to_yaml())  # the same grid, interrupted
    monkeypatch.setattr(bench, "run_cell", lambda *a: pytest.fail("a cell was computed"))
    with pytest.raises(MergeqError, match=re.escape(str(bad))):
        run_grid(load_config(grid), out)


@pytest.mark.parametrize("change, match", [
    ({"grid": {"seeds": []}}, r"grid\.seeds: must list at least one"),
    ({"grid": {"seeds": [0, 0]}}, r"grid\.seeds: lists 0 twice"),
    ({"ptq": {"methods": ["rtn", "rtn"]}}, r"ptq\.methods: lists 'rtn' twice"),
    ({"grid": {"target_sets": []}}, r"grid\.target_sets: must list at least one"),
    ({"grid": {"target_sets": ["uci"]}}, r"grid\.target_sets\[0\]: expected a list"),
    ({"grid": {"target_sets": [["uci", "uci"]]}}, r"grid\.target_sets\[0\]: lists 'uci' twice"),
    ({"grid": {"seeds": ["a"]}}, r"grid\.seeds\[0\]: expected int"),
])
def test_grid_axes_are_validated(tmp_path, change, match):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**GRID, **change}))
    with pytest.raises(MergeqError, match=match):
        load_config(path)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmd:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_pool_workers_exit_when_the_bench_process_is_killed(tmp_path):
    path = _grid_file(tmp_path / "grid.yaml",  # real cells: long enough that the workers are busy when it dies
                      {**GRID, "adapt": {"source": {"epochs": 50}}}, tmp_path / "cache")
    parent = _python("import sys\nfrom mergeq.cli import main\nsys.exit(main(sys.argv[1:]))", {},
                     "bench", str(path), "--out", str(tmp_path / "out"), "--workers", "2", "--quiet")
    deadline = time.time() + 90
    while len(_children(parent.pid)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = _children(parent.pid)
    assert len(workers) == 2
    parent.kill()
    parent.wait()
    deadline = time.time() + 15
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)  # clean up after a failure
    assert not left, "pool workers outlived their parent"
