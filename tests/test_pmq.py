"""mergeq pmq: merge full-precision experts, then quantize with rtn / gptq / epmq."""
import json

from mergeq.adapt import ShotConfig, SourceConfig
from mergeq.config import RunConfig
from mergeq.data import TARGET_DOMAINS
from mergeq.pmq import run_pmq


def test_pmq_rows_and_files(tmp_path):
    cfg = RunConfig(targets=list(TARGET_DOMAINS[:2]), preset="quick", methods=["rtn", "gptq", "epmq"], bits=["W4"],
                    source=SourceConfig(epochs=1), shot=ShotConfig(epochs=1), calib_size=64,
                    cache_dir=str(tmp_path / "cache"))
    res = run_pmq(cfg, tmp_path / "out", merges=["task_arithmetic"], methods=cfg.methods)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["merge"], r["method"], r["w_bits"], r["a_bits"]) for r in on_disk["rows"]] == [
        ("task_arithmetic", m, 4, None) for m in ("rtn", "gptq", "epmq")]
    for r in res["rows"]:
        assert set(r["merged"]) == {*TARGET_DOMAINS[:2], "hmean"} and 0 <= r["merged"]["hmean"] <= 1
    assert "| task_arithmetic | W4A32 |" in (tmp_path / "out" / "results.md").read_text()
