"""Errors name the file and the place (issue 24, item 6): undecodable or invalid config files,
invalid or deeply nested JSON in a checkpoint's header."""

import pytest
import torch
from safetensors.torch import save as st_save

from mergeq.checkpoint import model_from_checkpoint
from mergeq.cli import main
from mergeq.deploy import load_packed
from mergeq.errors import CheckpointError, ConfigError, MergeqError
from mergeq.experiments import load_config
from mergeq.io import META_KEY, earlier_results

DEEP = "[" * 100_000 + "]" * 100_000


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("content, match", [
    (b"ptq:\n  methods: [rtn]\n  bits: [W4A4\xff]\n", r"bad\.yaml is not valid UTF-8: byte 0xff at line 3"),
    (b"ptq:\n  methods: [rtn\nmerge: {}\n", r"config file .*bad\.yaml is not valid YAML at line 3, column 6"),
    (b"ptq: {methods: *nosuch}\n", r"config file .*bad\.yaml is not valid YAML at line 1, column 16: found undefined "
                                    "alias"),
])
def test_config_file_errors_name_the_file_and_the_place(tmp_path, capsys, content, match):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "bad.yaml" in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, match", [
    ('{"arch": "resnet8",', r"header metadata of .*h\.safetensors is not valid JSON: .* line 1, column 20"),
    (DEEP, r"header metadata of .*h\.safetensors is not usable JSON: its values are nested too deeply"),
])
def test_checkpoint_header_json_errors_name_the_file(tmp_path, capsys, text, match):
    path = tmp_path / "h.safetensors"
    path.write_bytes(st_save({"w": torch.zeros(2)}, metadata={"format": "pt", META_KEY: text}))
    with pytest.raises(CheckpointError, match=match):
        model_from_checkpoint(path)
    assert main(["export", "--model", str(path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "h.safetensors" in _one_line_error(capsys)
    packed = tmp_path / "p.safetensors"
    packed.write_bytes(st_save({"w": torch.zeros(2)}, metadata={"format": "mergeq-packed", "mergeq": text}))
    with pytest.raises(CheckpointError, match=match.replace("h\\.", "p\\.")):
        load_packed(packed)


def test_results_folder_with_deeply_nested_json_or_bad_yaml_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("preset: quick\n")
    (tmp_path / "results.json").write_text(DEEP)
    with pytest.raises(MergeqError, match="results.json is not usable JSON: its values are nested too deeply"):
        earlier_results(tmp_path)
    (tmp_path / "config.yaml").write_text("preset: [quick\n")
    with pytest.raises(MergeqError, match=r"config.yaml is not valid YAML at line 2, column 1: .*use another --out"):
        earlier_results(tmp_path)
