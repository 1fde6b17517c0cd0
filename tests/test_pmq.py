"""mergeq pmq: merge full-precision experts, then quantize with rtn / gptq / epmq; resume never drops rows."""
import json

import pytest
import yaml

from mergeq.cli import main
from mergeq.errors import MergeqError
from mergeq.experiments import run_pmq

from .conftest import tiny_config


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_pmq_rows_files_and_resume(tmp_path, model_cache):
    cfg = tiny_config(model_cache, {"pmq.merges": ["task_arithmetic"], "pmq.methods": ["rtn", "gptq", "epmq"],
                                    "pmq.bits": ["W4"]})
    out = tmp_path / "out"
    res = run_pmq(cfg, out)
    on_disk = json.loads((out / "results.json").read_text())
    assert [(r["merge"], r["method"], r["w_bits"], r["a_bits"]) for r in on_disk["rows"]] == [
        ("task_arithmetic", m, 4, None) for m in ("rtn", "gptq", "epmq")]
    for r in res["rows"]:
        assert set(r["merged"]) == {"uci", "noisy", "hmean"} and 0 <= r["merged"]["hmean"] <= 1
    md = (out / "results.md").read_text()
    assert "| task_arithmetic | W4A32 |" in md and "](hmean_vs_bits.png)" in md
    assert (out / "hmean_vs_bits.png").stat().st_size > 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["pmq"]["merges"] == ["task_arithmetic"] and recorded["ptq"]["options"]["epmq"] == {}
    # another pmq run into the same folder (issue 15: it overwrote results.json): rows are added, none dropped
    more = run_pmq(cfg.updated({"pmq.merges": ["ties"], "pmq.methods": ["rtn"]}), out)
    assert [(r["merge"], r["method"]) for r in more["rows"]] == [
        ("task_arithmetic", "rtn"), ("task_arithmetic", "gptq"), ("task_arithmetic", "epmq"), ("ties", "rtn")]
    assert more["rows"][:3] == res["rows"]
    assert yaml.safe_load((out / "config.yaml").read_text())["pmq"]["merges"] == ["task_arithmetic", "ties"]
    with pytest.raises(MergeqError, match=r"ptq\.options\.epmq\.anchor differ"):  # a setting of a common row
        run_pmq(cfg.updated({"ptq.options.epmq.anchor": 0.5}), out)
    # run's settings that pmq does not read are not a difference
    assert run_pmq(cfg.updated({"ptq.bits": ["W2A2"], "merge.rounding": "nearest"}), out)["rows"] == more["rows"]


def test_pmq_cli_flags_reach_the_config(tmp_path, model_cache):
    out = tmp_path / "cli"
    (tmp_path / "tiny.yaml").write_text(tiny_config(model_cache).to_yaml())
    assert main(["pmq", "--config", str(tmp_path / "tiny.yaml"), "--merges", "average", "--methods", "epmq",
                 "--bits", "W4", "--anchor", "0", "--out", str(out), "--quiet"]) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["ptq"]["options"]["epmq"] == {"anchor": 0.0} and recorded["pmq"]["merges"] == ["average"]
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["epmq"]
