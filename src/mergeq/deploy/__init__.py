"""Deployment: packed integer checkpoints (safetensors) and ONNX export of quantized models.

    from mergeq.deploy import save_packed, load_packed, export_onnx, plan_integer, IntegerSimulation
    save_packed(qmodel, "model.packed.safetensors", meta)   # int codes bit-packed, steps, JSON metadata
    model = load_packed("model.packed.safetensors")          # dequantized weights bit-identical
    export_onnx(qmodel, "model.onnx")                        # QDQ graph; onnxruntime runs it in float
    plan = plan_integer(qmodel, calib_images)                # 8-bit requantization steps, calibrated
    export_onnx(qmodel, "model.int8.onnx", kernels="int8", plan=plan)   # onnxruntime's integer kernels
    IntegerSimulation(qmodel, plan)(x)                       # the same integer arithmetic in PyTorch

``onnx`` is imported only by the ONNX functions (optional extra ``mergeq[deploy]``).
"""
from .integer import IntegerPlan, IntegerSimulation, plan_integer
from .onnx_export import KERNELS, export_onnx, ort_session, to_onnx, weight_storage
from .pack import ExportError, pack, packed_size, unpack
from .packed import check_exportable, load_packed, read_packed_metadata, save_packed

__all__ = ["ExportError", "IntegerPlan", "IntegerSimulation", "KERNELS", "check_exportable", "export_onnx",
           "load_packed", "ort_session", "pack", "packed_size", "plan_integer", "read_packed_metadata",
           "save_packed", "to_onnx", "unpack", "weight_storage"]
