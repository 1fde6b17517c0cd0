"""End-to-end smoke test of ``mergeq run`` on a shrunken quick preset (two targets, RTN)."""
import json

import pytest
import yaml

from mergeq.data import TARGET_DOMAINS

from mergeq.adapt import ShotConfig, SourceConfig
from mergeq.cli import main
from mergeq.config import RunConfig
from mergeq.pipeline import run

TINY = dict(
    targets=list(TARGET_DOMAINS[:2]), preset="quick", methods=["rtn"], bits=["W8A8", "W3A3"],
    source=SourceConfig(epochs=1), shot=ShotConfig(epochs=1), calib_size=64,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    cfg = RunConfig(**TINY, cache_dir=str(base / "cache"))
    return base, cfg, run(cfg, base / "out")


def test_results_schema_and_files(tiny_run):
    base, cfg, res = tiny_run
    out = base / "out"
    assert {"results.json", "results.md", "config.yaml"} <= {p.name for p in out.iterdir()}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["benchmark"] == "digits" and on_disk["targets"] == list(TARGET_DOMAINS[:2]) and on_disk["seed"] == 0
    assert set(on_disk["fp"]["experts"]) == set(TARGET_DOMAINS[:2])
    assert set(on_disk["fp"]["merged"]) == {*TARGET_DOMAINS[:2], "hmean"}
    assert [(r["method"], r["w_bits"], r["a_bits"]) for r in on_disk["rows"]] == [("rtn", 8, 8), ("rtn", 3, 3)]
    for r in on_disk["rows"]:
        assert all(0.0 <= v <= 1.0 for v in [*r["experts"].values(), *r["merged"].values()])
        assert r["seconds"] >= 0


def test_config_yaml_loads_back_into_the_same_config(tiny_run):
    base, cfg, _ = tiny_run
    text = (base / "out" / "config.yaml").read_text()
    again = RunConfig.from_dict(yaml.safe_load(text))
    assert again.to_yaml() == text == cfg.resolved().to_yaml()


def test_same_seed_same_numbers_and_resume(tiny_run, tmp_path):
    base, cfg, res = tiny_run
    # a fresh output folder reusing the cached models must reproduce every number exactly
    res2 = run(cfg, tmp_path / "again")
    assert res2["rows"] == [dict(r, seconds=r2["seconds"], seconds_per_expert=r2["seconds_per_expert"])
                            for r, r2 in zip(res["rows"], res2["rows"])]
    assert res2["fp"] == res["fp"]
    # rerunning into the same folder resumes: finished rows are kept as they were (same timings)
    res3 = run(cfg, base / "out")
    assert res3["rows"] == res["rows"]


def test_cli_rejects_bad_bits_and_methods(tmp_path, capsys):
    assert main(["run", "--bits", "W9A4", "--out", str(tmp_path)]) == 2
    assert "from 2 to 8" in capsys.readouterr().err
    assert main(["run", "--methods", "nope", "--targets", "uci", "--preset", "quick", "--out", str(tmp_path),
                 "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 2
    assert "unknown PTQ method 'nope'" in capsys.readouterr().err


def test_quantize_and_merge_commands_round_trip(tiny_run, tmp_path):
    import torch

    from mergeq.nn import quant_modules
    from mergeq.zoo import model_from_checkpoint

    base, _, _ = tiny_run
    experts = sorted((base / "cache").glob("expert-*.safetensors"))
    assert len(experts) == 2
    qpaths = []
    for i, e in enumerate(experts):
        q = tmp_path / f"q{i}.safetensors"
        assert main(["quantize", "--model", str(e), "--bits", "W4A4", "--out", str(q), "--preset", "quick",
                     "--quiet", "--cache-dir", str(base / "cache")]) == 0
        qpaths.append(q)
    model, meta = model_from_checkpoint(qpaths[0])
    assert meta["quant_layers"] and meta["bits"] == "W4A4"
    for _, m in quant_modules(model):
        assert torch.equal(m.weight, m.int_weight() * m.w_step)
    merged_path = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, qpaths), "--rounding", "noise", "--samples", "3", "--out", str(merged_path)]) == 0
    report = json.loads(merged_path.with_suffix(".report.json").read_text())
    assert set(report["accuracy"]) == set(report["domains"]) | {"hmean"}
    merged, _ = model_from_checkpoint(merged_path)
    x = torch.randn(4, 3, 32, 32)
    again, _ = model_from_checkpoint(merged_path)
    assert torch.equal(merged(x), again(x))


def test_threads_option_is_validated_and_applied():
    import torch

    from mergeq.cli import _config, build_parser

    with pytest.raises(ValueError, match="threads"):
        RunConfig(threads=0)
    args = build_parser().parse_args(["run", "--threads", "1", "--preset", "quick"])
    cfg = _config(args)
    assert cfg.threads == 1
    before = torch.get_num_threads()
    try:
        RunConfig(threads=1).apply_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_run_into_a_folder_of_other_bits_keeps_its_rows(tiny_run, tmp_path):
    """Issue 15: results.json once went from 4 rows to 1 when --out held another run's rows."""
    import dataclasses
    import shutil

    from mergeq.errors import MergeqError

    base, cfg, res = tiny_run
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    more = run(dataclasses.replace(cfg, bits=["W4A4"]), out)
    assert [(r["method"], r["w_bits"], r["a_bits"]) for r in more["rows"]] == [("rtn", 8, 8), ("rtn", 3, 3),
                                                                              ("rtn", 4, 4)]
    assert more["rows"][:2] == res["rows"]  # the earlier rows, untouched
    assert json.loads((out / "results.json").read_text())["rows"] == more["rows"]
    assert yaml.safe_load((out / "config.yaml").read_text())["bits"] == ["W8A8", "W3A3", "W4A4"]
    before = (out / "results.json").read_text()
    for change, name in [({"seed": 1}, "seed"), ({"calib_size": 32}, "calib_size"),
                         ({"step_method": "absmax"}, "step_method")]:
        with pytest.raises(MergeqError, match=f"other settings .*{name}"):
            run(dataclasses.replace(cfg, **change), out)
    assert (out / "results.json").read_text() == before
