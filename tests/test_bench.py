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

from mergeq.data import TARGET_DOMAINS

from mergeq import bench
from mergeq.bench import load_grid, run_grid
from mergeq.errors import MergeqError

GRID = {
    "preset": "quick", "source": {"epochs": 1}, "shot": {"epochs": 1}, "calib_size": 64,
    "methods": ["rtn"], "bits": ["W8A8", "W4A4"], "target_sets": [list(TARGET_DOMAINS[:2])], "seeds": [0],
}


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401

        return True
    except Exception:
        return False


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, "cache_dir": str(tmp_path / "cache")}))
    return path


def test_two_cell_grid_and_resume(grid, tmp_path, monkeypatch):
    out = tmp_path / "out"
    events = []
    results = run_grid(grid, out, progress=lambda i, n, text: events.append((i, n, text)))
    assert [r["bits"] for r in results] == ["W8A8", "W4A4"]
    # each cell is announced when it starts, then reported done with a time estimate
    assert [(i, n) for i, n, _ in events] == [(0, 2), (1, 2), (1, 2), (2, 2)]
    assert events[0][2].startswith("running ") and "W8A8" in events[0][2]
    assert "done" in events[1][2] and "s left" in events[1][2] and "W4A4" in events[2][2]
    csv_lines = (out / "bench.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("targets,seed,bits,method")
    md = (out / "bench.md").read_text()
    assert "| rtn |" in md and "W4A4" in md and "**" in md
    fp = results[0]["fp_merged"]["hmean"]
    assert results[1]["fp_merged"]["hmean"] == fp and f"| full precision (merged) | {100 * fp:.1f} ± 0.0 |" in md
    # "kill" the grid after its first cell: remove the second cell's file, then rerun
    cells = sorted((out / "cells").glob("*.json"))
    second = next(p for p in cells if "W4A4" in p.name)
    first = next(p for p in cells if "W8A8" in p.name)
    first_text = first.read_text()
    second.unlink()
    ran = []
    real = bench.run_cell
    monkeypatch.setattr(bench, "run_cell", lambda b, c, o, *a: ran.append(c.key) or real(b, c, o, *a))
    again = run_grid(grid, out)
    assert ran == [json.loads(second.read_text())["key"]]
    assert first.read_text() == first_text
    assert [r["merged"] for r in again] == [r["merged"] for r in results]


def test_grid_errors(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"methods": ["rtn"], "bits": ["W4A4"]}))
    with pytest.raises(ValueError, match="target_sets"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({**GRID, "bits": ["W1A4"]}))
    with pytest.raises(ValueError, match="from 2 to 8"):
        load_grid(bad)


@pytest.mark.skipif(not _ray_available(), reason="Ray is not installed (pip install 'mergeq[ray]')")
def test_ray_executor_matches_local(grid, tmp_path):
    local = run_grid(grid, tmp_path / "local")
    remote = run_grid(grid, tmp_path / "ray", executor="ray")
    assert [r["merged"] for r in remote] == [r["merged"] for r in local]
    assert [r["experts"] for r in remote] == [r["experts"] for r in local]


def test_resume_refuses_other_settings(grid, tmp_path):
    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    (out / "grid.yaml").write_text(yaml.safe_dump({**GRID, "calib_size": 32}))
    with pytest.raises(ValueError, match="calib_size differ"):
        run_grid(grid, out)
    assert not list((out / "cells").iterdir())


# --- concurrent runs, damaged cells, dead parents (issue 15) -----------------------------------

FAKE_EXPERIMENT = '''
import os, sys, time
from pathlib import Path
import mergeq.pipeline

class FakeExperiment:
    """Stands in for training: a cell takes CELL_SECONDS and says which process computed it."""
    def __init__(self, cfg, progress=False):
        self.cfg = cfg.resolved()
    def row(self, method, qcfg):
        marks = Path(os.environ["MARKS"])
        marks.mkdir(exist_ok=True)
        (marks / f"{os.getpid()}-{qcfg.tag}").touch()
        time.sleep(float(os.environ.get("CELL_SECONDS", "0")))
        acc = {d: 0.5 for d in self.cfg.targets}
        return {"method": method, "w_bits": qcfg.w_bits, "a_bits": qcfg.a_bits, "experts": acc,
                "merged": {**acc, "hmean": 0.5}, "seconds": 0.0, "seconds_per_expert": 0.0}
    def fp_merged(self):
        return {**{d: 0.5 for d in self.cfg.targets}, "hmean": 0.5}
'''

SIX_BITS = ["W8A8", "W7A7", "W6A6", "W5A5", "W4A4", "W3A3"]


def _fake_grid(tmp_path, bits=SIX_BITS):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, "bits": bits, "cache_dir": str(tmp_path / "cache")}))
    return path


def _marks(folder):
    return [p.name.split("-", 1) for p in folder.iterdir()] if folder.exists() else []


def test_cell_locked_by_another_process_is_not_computed_twice(tmp_path, monkeypatch):
    """In process: a cell whose lock another holder has is put off, then its result is read."""
    import threading

    from mergeq import pipeline
    from mergeq.io import file_lock

    namespace = {}
    exec(FAKE_EXPERIMENT, namespace)
    monkeypatch.setattr(pipeline, "Experiment", namespace["FakeExperiment"])
    monkeypatch.setenv("MARKS", str(tmp_path / "marks"))
    grid, out = _fake_grid(tmp_path, ["W8A8", "W4A4"]), tmp_path / "out"
    _, cells = load_grid(grid)
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


def test_two_bench_processes_on_one_out_split_the_cells(tmp_path):
    grid, out, marks = _fake_grid(tmp_path), tmp_path / "out", tmp_path / "marks"
    code = FAKE_EXPERIMENT + "\n".join(["", "mergeq.pipeline.Experiment = FakeExperiment",
                                         "from mergeq.cli import main", "sys.exit(main(sys.argv[1:]))"])
    env = {"MARKS": str(marks), "CELL_SECONDS": "1"}
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
    _, cells = load_grid(grid)
    (out / "cells").mkdir(parents=True)
    bad = out / "cells" / f"{cells[0].key}.json"
    bad.write_text('{"key": "trunc')
    monkeypatch.setattr(bench, "run_cell", lambda *a: pytest.fail("a cell was computed"))
    with pytest.raises(MergeqError, match=re.escape(str(bad))):
        run_grid(grid, out)


@pytest.mark.parametrize("change, match", [
    ({"seeds": []}, "seeds must list at least one"),
    ({"seeds": [0, 0]}, "seeds lists 0 twice"),
    ({"methods": ["rtn", "rtn"]}, "methods lists 'rtn' twice"),
    ({"target_sets": []}, "target_sets must list at least one"),
    ({"target_sets": ["uci"]}, "target_sets must be"),
    ({"seeds": ["a"]}, "seeds must be"),
])
def test_grid_axes_are_validated(tmp_path, change, match):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**GRID, **change}))
    with pytest.raises(MergeqError, match=match):
        load_grid(path)


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
def test_pool_workers_exit_when_the_bench_process_is_killed(tmp_path):
    path = tmp_path / "grid.yaml"  # real cells: long enough that the workers are busy when it dies
    path.write_text(yaml.safe_dump({**GRID, "source": {"epochs": 50}, "cache_dir": str(tmp_path / "cache")}))
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
