"""Models whose forward returns a dict or a tuple (``model.output``) export to ONNX, QDQ and int8,
and ``output: auto`` on a tuple whose first item is not the logits names the index that is."""
import numpy as np
import pytest
import torch
from torch import nn

from mergeq.deploy import IntegerPlan, IntegerSimulation, export_onnx, ort_session
from mergeq.errors import ModelError
from mergeq.models.spec import check_logits
from mergeq.nn.output import LogitsAdapter
from mergeq.ptq import quantize

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


class LabNet(nn.Module):
    """Logits and features, as a dict or as a (features, logits) tuple."""

    def __init__(self, as_tuple: bool = False, num_classes: int = 5) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features)
        return (features, logits) if self.as_tuple else {"logits": logits, "features": features}


def _images(n, seed):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run(path, x):
    sess = ort_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("as_tuple,select", [(False, "logits"), (False, "auto"), (True, 1)])
def test_adapter_models_export_qdq_and_int8(tmp_path, as_tuple, select):
    import json

    import onnx

    torch.manual_seed(0)
    q = quantize(LogitsAdapter(LabNet(as_tuple), select).eval(), "rtn", calib=_images(32, 0), w_bits=4, a_bits=8)
    x = _images(24, 1)
    with torch.no_grad():
        want = q(x).numpy()
    qdq = _run(export_onnx(q, tmp_path / "qdq.onnx"), x)
    assert qdq.shape == (24, 5) and np.abs(qdq - want).max() < 1e-4
    path = export_onnx(q, tmp_path / "int8.onnx", kernels="int8", calib=_images(32, 2))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    plan = IntegerPlan.from_json(json.loads(props["mergeq"])["integer_plan"])
    with torch.no_grad():
        sim = IntegerSimulation(q, plan)(x).numpy()
    out = _run(path, x)
    assert np.array_equal(out.argmax(1), sim.argmax(1)) and np.abs(out - sim).max() < 1e-4


def test_auto_on_a_tuple_suggests_the_index_of_the_logits():
    model = LogitsAdapter(LabNet(as_tuple=True), "auto")  # auto takes item 0: the features
    with pytest.raises(ModelError, match=r"returns logits of shape \(2, 8\) for 2 inputs; expected \(2, 5\) for 5 "
                                         r"classes; item 1 of its output \(a tuple of 2 items\) has that shape: set "
                                         r"model.output: 1$"):
        check_logits(model, _images(2, 0), 5, "model 'lab'")


def test_int8_export_names_the_data_folder_it_needs(tmp_path):
    from mergeq.deploy import ExportError
    from mergeq.experiments.steps import export_calibration

    meta = {"data": {"kind": "folder", "root": str(tmp_path / "moved"), "source": "Real_World", "targets": ["Art"],
                     "image_size": 16, "normalize": "standardize"}, "seed": 0, "domain": "Art"}
    with pytest.raises(ExportError, match=r"^--kernels int8 calibrates on the images of domains \['Art'\] of the "
                                          r"checkpoint's data folder .*moved, which cannot be read: data root"):
        export_calibration(meta, 8)
