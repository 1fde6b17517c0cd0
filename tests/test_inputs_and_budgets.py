"""Defaults that follow the model and the data: input size / normalisation from the model spec,
training budgets in optimizer steps with a floor (the digits presets keep their step counts)."""
import sys
import types

import pytest

from mergeq.adapt.source import passes, train_steps
from mergeq.data.digits import load_digits_benchmark
from mergeq.errors import ModelError
from mergeq.experiments import presets, resolve
from mergeq.experiments.config import Config
from mergeq.experiments.run import default_workers
from mergeq.models.inputs import ModelInput, model_input


def test_registered_and_builder_models_name_their_input():
    assert model_input("resnet8") == ModelInput(32, 37, "standardize")
    assert model_input({"name": "vit_tiny", "kwargs": {"image_size": 64}}) == ModelInput(64, 73, "standardize")
    assert model_input({"builder": "my_lab.nets:make"}) == ModelInput(224, 256, "imagenet")


def test_torchvision_and_timm_inputs_come_from_their_transforms(monkeypatch):
    """Stand-ins for the two packages (not installed here), shaped as their APIs are."""
    transforms = types.SimpleNamespace(crop_size=[224], resize_size=[232], mean=[0.485, 0.456, 0.406],
                                       std=[0.229, 0.224, 0.225])
    weights = types.SimpleNamespace(DEFAULT=types.SimpleNamespace(transforms=lambda: transforms))
    tv = types.SimpleNamespace(models=types.SimpleNamespace(get_model_weights=lambda name: weights))
    data_cfg = {"input_size": (3, 256, 256), "crop_pct": 0.95, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    timm = types.SimpleNamespace(create_model=lambda name, pretrained: object(),
                                 data=types.SimpleNamespace(resolve_data_config=lambda args, model: data_cfg))
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "timm", timm)
    assert model_input("torchvision:resnet50") == ModelInput(224, 232, "imagenet")
    assert model_input("timm:vit_small_patch16_224") == ModelInput(256, 269, "inception")
    data_cfg.update(mean=(0.1, 0.2, 0.3))
    with pytest.raises(ModelError, match=r"^timm:vit_small_patch16_224 normalises with mean \(0.1, 0.2, 0.3\).*"
                                         r"set data.normalize"):
        model_input("timm:vit_small_patch16_224")


def test_folder_data_takes_size_and_normalisation_from_the_model(tmp_path):
    data = {"kind": "folder", "root": str(tmp_path), "source": "A"}
    cfg = resolve(Config.from_dict({"data": data}))  # the preset's resnet8
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.normalize) == (32, 37, "standardize")
    assert cfg.adapt.source.color > 0  # standardised data keep source training's colour jitter
    cfg = resolve(Config.from_dict({"data": {**data, "image_size": 64}}))
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.normalize) == (64, 73, "standardize")
    cfg = resolve(Config.from_dict({"data": {**data, "normalize": "imagenet"}, "model": "vit_tiny"}))
    assert (cfg.data.image_size, cfg.data.normalize, cfg.adapt.source.color) == (32, "imagenet", 0.0)
    assert resolve(cfg) == cfg  # the resolved config resolves to itself


@pytest.fixture(scope="module")
def digits_sizes():
    """Training-split sizes of the four digits domains (the same as source or as target)."""
    bench = load_digits_benchmark(seed=0)
    return [len(bench.source.train), *(len(t.train) for t in bench.targets.values())]


@pytest.mark.parametrize("preset", presets.PRESET_NAMES)
def test_digits_presets_keep_their_epoch_step_counts(preset, digits_sizes):
    """On every digits domain (as source or target) the floor is below the epochs' step count."""
    sizes = digits_sizes
    assert sorted(sizes) == [500, 500, 897, 2000]
    for cfg in presets.adapt(preset):
        for n in sizes:
            assert train_steps(cfg, n) == cfg.epochs * (n // cfg.batch_size) > cfg.min_steps


def test_small_data_train_at_least_the_floor_and_steps_win():
    source, shot = presets.adapt("quick")
    assert train_steps(source, 96) == source.min_steps == 80  # 6 passes of 3 steps would be 18
    assert train_steps(shot, 120) == shot.min_steps == 50
    assert train_steps(type(source)(steps=7), 50_000) == 7
    assert train_steps(source, 50_000) == 6 * 1562
    with pytest.raises(ValueError, match="steps must be at least 1"):
        train_steps(type(source)(steps=0), 10)


def test_passes_split_a_budget_into_shuffles():
    assert list(passes(96, 32, 8)) == [(0, 3), (1, 3), (2, 2)]
    assert list(passes(10, 32, 2)) == [(0, 1), (1, 1)]  # fewer items than a batch: one step per pass
    assert sum(s for _, s in passes(2000, 32, 372)) == 372 and len(list(passes(2000, 32, 372))) == 6


def test_run_workers_default_to_one_per_device_on_a_gpu():
    assert default_workers("cpu", 4) == 4 and default_workers("cpu:0", 2) == 2
    assert default_workers("cuda", 16) == 1 and default_workers("cuda:1", 16) == 1
