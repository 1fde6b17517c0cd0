"""benchmarks/gpu_check.py's CPU-runnable parts: the refusal without a GPU, the arguments, every
command line it runs (parsed by mergeq's own parser), the built-in ResNet-50 against torchvision's
numbers, the estimate arithmetic, the table and JSON, and its probe on the logical GPU."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mergeq.cli import build_parser, load_cli_config

from .conftest import randomize_bn, tiny_resnet
from .logical_device import LogicalCuda

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_check", None)


def test_without_a_gpu_it_refuses_in_one_line(gc, tmp_path, capsys):
    assert not torch.cuda.is_available()
    assert gc.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_check: no CUDA device") and "\n" not in err and not any(tmp_path.iterdir())
    assert gc.no_cuda("cpu") is None


def test_arguments(gc):
    args = gc.parse_args([])
    assert args.device == "cuda" and args.methods == list(gc.METHODS) and args.budget == 300 and not args.quick
    assert gc.parse_args(["--methods", "hdrq, qdrop", "--quick"]).methods == ["hdrq", "qdrop"]
    with pytest.raises(SystemExit):
        gc.parse_args(["--methods", "hdrq,nope"])


def test_every_command_line_parses_with_its_device_flags(gc, tmp_path):
    parser = build_parser()
    cmds = gc.commands(quick=True)
    names = [c.name for c in cmds]
    assert {"run", "run-noise-bn", "run-float-act", "run-none", "pmq", "tta", "bench", "compare", "train-source",
            "merge", "export", "barrier", "surface", "run-streets"} <= set(names) and len(set(names)) == len(names)
    for c in cmds:
        argv = c.argv(tmp_path, "cuda")
        flags = [] if argv[0] == "export" else ["--device", "cuda"] + ([] if argv[0] == "merge" else ["--threads", "1"])
        args = parser.parse_args(argv + flags)  # an unknown flag would exit here
        assert args.command == argv[0]
        if argv[0] == "run":  # its config is whole on the command line: valid as given
            with LogicalCuda():
                cfg = load_cli_config(args)
            streets = c.name == "run-streets"  # segmentation: the embedded streets benchmark
            assert cfg.model.name == ("deeplab_mini" if streets else "resnet8")
            assert cfg.data.kind == ("streets" if streets else "digits")
    assert {" ".join(c.argv(tmp_path, "cuda")).count("merge.recalibrate=") for c in cmds if c.name.startswith("run")} \
        == {0, 1}


def test_the_built_in_resnet50_has_torchvision_s_layers(gc):
    from mergeq.nn.blocks import partition

    with torch.device("meta"):
        model = gc.ResNet()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision resnet50, 1000 classes
    assert gc.forward_macs(model, (1, 3, 224, 224)) == 4_089_184_256  # conv + fc MACs at 224 px
    units = [n for n, _ in partition(model)]
    assert len(units) == 18 and units[0] == "stem.0" and units[-1] == "fc"  # stem, 16 bottlenecks, head
    with torch.device("meta"):
        seg, r101 = gc.SegNet(), gc.ResNet((3, 4, 23, 3))
        assert seg.backbone.features(torch.empty(1, 3, 256, 256)).shape == (1, 2048, 32, 32)  # output stride 8
    ratio = gc.forward_macs(seg, (1, 3, 256, 256)) / gc.forward_macs(r101, (1, 3, 256, 256))
    assert 4.0 < ratio < 5.0  # layer3 at 4x and layer4 at 16x the positions of the plain ResNet-101


def _probe(step_ms: dict) -> dict:
    def method(s):
        graphed = {"units": 18, "step_ms": s, "fp_ms": s / 2, "ratio": 2.0, "per_unit": []}
        eager = {**graphed, "step_ms": 3 * s, "ratio": 6.0}
        return {**graphed, "graphed": graphed, "eager": eager, "peak_gib": 1.5,
                "graphed_vs_eager_max_rel_output_diff": 2e-6, "graph_fallbacks": ["unit x: cannot be captured"]}
    return {"model": "m", "size": 224, "batch": 32, "macs": 1000, "methods": {m: method(s) for m, s in step_ms.items()}}


def test_estimates(gc):
    e = gc.estimates(_probe({"brecq": 90.0, "qdrop": 126.0, "hdrq": 180.0, "ttaq": 360.0}), seg_macs=5500)
    assert gc.gpu_hours(180.0) == pytest.approx(1.0)  # 20,000 steps of 0.18 s
    assert e["office_home"]["hdrq"] == pytest.approx(1.0) and e["office_home"]["brecq"] == pytest.approx(0.5)
    assert e["segmentation"]["hdrq"] == pytest.approx(5.5) and e["seg_macs_ratio"] == pytest.approx(5.5)
    block = (0.5 + 0.7 + 1.0) * 5 * 3  # brecq + qdrop + hdrq (Table 2's methods; ttaq is not in it)
    assert e["office_home_block"] == pytest.approx(block) and e["office_home_table"] == pytest.approx(4 * block)
    assert e["segmentation_table"] == pytest.approx(5.5 * (0.5 + 0.7 + 1.0) * 2 * 2)
    assert gc.estimates(_probe({"hdrq": 180.0}), 1000, iters=2000)["office_home_block"] == pytest.approx(1.5)


def test_table_and_json(gc, tmp_path):
    probe = _probe({"hdrq": 180.0})
    run = {"name": "run", "what": "merged hmean %", "cuda": {"exit": 0, "seconds": 3.0, "number": 81.5},
           "cpu": {"exit": 0, "seconds": 9.0, "number": 81.25}}
    tta = {"name": "tta", "what": "mean error %", "cuda": {"exit": 2, "seconds": 1.0, "number": None, "error": "boom"},
           "cpu": {}}
    result = {"title": "mergeq GPU check: X", "device": "cuda", "probe": probe, "estimates": gc.estimates(probe, 2000),
              "commands": [run, tta]}
    md, js = gc.write(tmp_path / "out", result)
    assert json.loads(js.read_text()) == result
    lines = md.read_text().splitlines()
    assert lines[0] == "mergeq GPU check: X" and lines[2].startswith("| part | item |")
    assert "| command | run: merged hmean % | 0 / 0 | 3.0 / 9.0 | 81.5 | 81.25 | 0.25 |" in lines
    assert any(line.startswith("| command | tta: mean error % (boom) | 2 / — |") and "| — | — | — |" in line
               for line in lines)
    assert any("hdrq: step (CUDA graphs) / FP f+b over 18 units" in line and "**2.00**" in line
               and "eager 540.00 ms = 6.00" in line and "unit outputs within 2.0e-06" in line
               and "1 unit run(s) not captured, e.g. unit x: cannot be captured" in line for line in lines)
    assert any("| 1.00 / 2.0 |" in line for line in lines)  # hours per expert and bit pair: R50 / segmentation


def test_the_probe_on_the_logical_gpu(gc, one_thread):
    """The probe's CUDA path (steps as CUDA graphs and eager, synchronised wall clock, peak memory), tiny."""
    torch.manual_seed(0)
    with LogicalCuda():
        res = gc.probe("cuda", ["adaround", "brecq"], size=16, batch=4, n_calib=8, steps=2, warmup=20,
                       model=randomize_bn(tiny_resnet()))
    for m, units in (("adaround", 7), ("brecq", 4)):  # adaround: layer by layer
        r = res["methods"][m]
        assert r["units"] == units and len(r["per_unit"]) == units and r["fp_ms"] > 0 and r["peak_gib"] == 0.0
        assert r["ratio"] == pytest.approx(r["step_ms"] / r["fp_ms"])
        assert r["step_ms"] == r["graphed"]["step_ms"] and r["eager"]["units"] == units  # both, graphs the headline
        assert r["graphed_vs_eager_max_rel_output_diff"] == 0.0  # CPU kernels on the logical GPU: the same numbers
        assert r["graph_fallbacks"] == []  # every unit's step was captured
    assert res["macs"] == gc.forward_macs(tiny_resnet(), (4, 3, 16, 16))
