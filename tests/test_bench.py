"""mergeq bench: a two-cell grid writes CSV and Markdown, and a rerun finishes only missing cells."""
import json

import pytest
import yaml

from mergeq.data import TARGET_DOMAINS

from mergeq import bench
from mergeq.bench import load_grid, run_grid

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
