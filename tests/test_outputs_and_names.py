"""Files stay in their folders and no output overwrites an input (issue 24, item 2): domain and
class names inside their root, outputs never an input or another checkpoint's side file."""
import json

import pytest
import torch
import yaml

from mergeq.checkpoint import save_model
from mergeq.cli import main
from mergeq.data import FolderDataError, load_data
from mergeq.data.folder import load_folder_benchmark
from mergeq.errors import ConfigError
from mergeq.experiments import Config
from mergeq.experiments.steps import config_path, side_file
from mergeq.models import build_model

from .test_data_spec import make_tree

META = {"arch": "resnet8", "arch_kwargs": {"width": 4}, "num_classes": 10}
ESCAPES = ["B/../../../../x/dom", "..", "/etc", "a\\b", ""]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data") / "d", domains={"A": "png", "B": "png"}, n=2)


@pytest.mark.parametrize("name", ESCAPES)
def test_domain_and_class_names_stay_inside_the_root(tree, tmp_path, capsys, name):
    """The issue's case: a target `B/../../../../x/dom` read a domain outside data.root and wrote
    its cached model outside runtime.cache_dir."""
    with pytest.raises(FolderDataError, match="must be one folder name inside the data root"):
        load_folder_benchmark(tree, source="A", targets=[name])
    spec = {"kind": "folder", "root": str(tree), "source": "A", "image_size": 8}
    for key, value in (("targets", [name]), ("source", name or "."), ("classes", ["circle", name])):
        with pytest.raises(ConfigError, match=f"data.{key}: .*name .* must be one folder name inside the data root"):
            Config.from_dict({"data": {**spec, key: value}})
    with pytest.raises(ConfigError, match=r"grid.target_sets\[0\]: domain name"):
        Config.from_dict({"data": spec, "grid": {"target_sets": [[name or "..", "B"]]}})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": spec}))
    assert main(["run", "--config", str(config), "--targets", name or "..", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside the data root" in err and not (tmp_path / "r").exists()
    assert load_data({**spec, "targets": ["B"]}).targets["B"].name == "B"  # a plain name still works


def test_side_files_are_named_so_that_two_checkpoints_never_share_one(tmp_path):
    assert config_path(tmp_path / "m.safetensors") == tmp_path / "m.config.yaml"
    assert config_path(tmp_path / "m.json") == tmp_path / "m.json.config.yaml"
    assert side_file(tmp_path / "m.safetensors", ".report.json") == tmp_path / "m.report.json"
    assert side_file(tmp_path / "m.json", ".report.json") == tmp_path / "m.json.report.json"


@pytest.fixture
def experts(tmp_path):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(str(save_model(build_model("resnet8", 10, width=4), tmp_path / f"e{i}.safetensors", META)))
    return paths


def _refused(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_no_output_overwrites_an_input_or_another_checkpoints_side_file(tmp_path, capsys, experts):
    a, b = experts
    before = {p: open(p, "rb").read() for p in experts}
    m = str(tmp_path / "m.safetensors")
    # the case: --report naming an expert replaced it with the JSON report
    _refused(capsys, ["merge", a, b, "--out", m, "--report", b], f"--report {b} is the input {b}")
    _refused(capsys, ["merge", a, b, "--out", a], f"--out {a} is the input {a}")
    _refused(capsys, ["merge", a, a, "--method", "task_arithmetic", "--base", b, "--out", b], "is the input")
    _refused(capsys, ["merge", a, b, "--out", m, "--report", str(tmp_path / "e0.report.json")],
             "is the side file of the checkpoint")
    _refused(capsys, ["merge", a, b, "--out", m, "--report", str(tmp_path / "r.txt")], "give a path ending in .json")
    _refused(capsys, ["merge", a, b, "--out", str(tmp_path / "x.config.yaml")], "named like a checkpoint's side file")
    _refused(capsys, ["export", "--model", a, "--out", a], "is the input")
    _refused(capsys, ["quantize", "--model", a, "--domain", "uci", "--out", a], "is the input")
    _refused(capsys, ["adapt", "--source", a, "--domain", "uci", "--out", a], "is the input")
    assert {p: open(p, "rb").read() for p in experts} == before
    # the case: a merge --out m2/uci-w4a4.json overwrote the recorded uci-w4a4.config.yaml
    recorded = tmp_path / "e0.config.yaml"
    recorded.write_text("preset: quick\n")
    assert main(["merge", a, b, "--out", str(tmp_path / "e0.json")]) == 0
    assert recorded.read_text() == "preset: quick\n" and (tmp_path / "e0.json.config.yaml").is_file()
    assert json.loads((tmp_path / "e0.json.report.json").read_text())["method"] == "average"
    # P and P.safetensors would share P.config.yaml: refused
    _refused(capsys, ["merge", a, b, "--out", str(tmp_path / "e1")], "is the side file of the checkpoint")
