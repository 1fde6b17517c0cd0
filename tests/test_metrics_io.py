import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from mergeq import evaluate, harmonic_mean
from mergeq.errors import CheckpointError
from mergeq.eval import accuracy
from mergeq.io import load_checkpoint, save_checkpoint


def test_harmonic_mean_values():
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean({"a": 1.0, "b": 0.5}) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.0]) == 0.0
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        harmonic_mean([1.5])


@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6))
def test_harmonic_mean_between_min_and_arithmetic_mean(vals):
    h = harmonic_mean(vals)
    assert min(vals) - 1e-9 <= h <= sum(vals) / len(vals) + 1e-9


class Fixed(nn.Module):
    """Predicts class = first input feature."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), 3).float()


def test_accuracy_and_evaluate():
    x = torch.tensor([[0.0], [1.0], [2.0], [1.0]])
    good = TensorDataset(x, torch.tensor([0, 1, 2, 1]))
    half = TensorDataset(x, torch.tensor([0, 1, 0, 0]))
    assert accuracy(Fixed(), good) == 1.0
    res = evaluate(Fixed(), {"good": good, "half": half})
    assert res == {"good": 1.0, "half": 0.5, "hmean": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="empty"):
        accuracy(Fixed(), TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)))


def test_checkpoint_round_trip(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.arange(3)}
    path = save_checkpoint(sd, tmp_path / "m.safetensors", {"arch": "x"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"arch": "x"}
    assert all(torch.equal(sd[k], loaded[k]) for k in sd)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_missing_truncated_and_bad_metadata_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = save_checkpoint({"w": torch.randn(64, 64)}, tmp_path / "m.safetensors", {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path)
    # the earlier two-file form: a broken sidecar is named
    save_file({"w": torch.randn(2)}, str(path), metadata={"format": "pt", "mergeq": "1"})
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_checkpoint_is_one_file_with_its_metadata_in_the_header(tmp_path):
    path = save_checkpoint({"w": torch.zeros(1)}, tmp_path / "a" / "m.safetensors", {"domain": "uci"})
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]
    assert load_checkpoint(path)[1] == {"domain": "uci"}


def test_report_source_row_hmean_is_over_targets_only():
    from mergeq.experiments.report import run_markdown

    acc = {"a": 0.5, "b": 1.0}
    res = {"benchmark": "digits", "seed": 0, "targets": ["a", "b"], "rows": [],
           "source": {"src": 1.0, **acc, "hmean": 0.75},  # hmean over 3 domains, as evaluate() gives it
           "fp": {"experts": acc, "merged": {**acc, "hmean": 2 / 3}}}
    row = next(line for line in run_markdown(res).splitlines() if line.startswith("| source"))
    assert row.split("|")[-3].strip() == "66.7"  # 2 / (1/0.5 + 1/1.0)


def test_model_cache_key_includes_thread_count_and_keeps_the_digits_keys(tmp_path):
    """CPU training repeats bit for bit only for the same number of torch threads: no cross reuse.
    For the digits data and a registered model the key is the one of the cache before issue 16."""
    import hashlib
    import json

    from mergeq.experiments import Pool

    from .conftest import tiny_config

    before = torch.get_num_threads()
    try:
        keys = []
        for n in (1, 2, 1):
            pool = Pool(tiny_config(tmp_path, {"runtime.threads": n}))
            keys.append(pool._source_key)
    finally:
        torch.set_num_threads(before)
    assert keys[0] != keys[1] and keys[0] == keys[2]
    old = {"benchmark": "digits", "arch": "resnet8", "arch_kwargs": {"width": 4}, "num_classes": 10, "seed": 0,
           "source": pool.cfg.to_dict()["adapt"]["source"], "compute": {"device": "cpu", "threads": 1}}
    assert keys[0] == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
