"""Deployment: packed integer checkpoints (safetensors) and QDQ ONNX export of quantized models.

    from mergeq.deploy import save_packed, load_packed, export_onnx
    save_packed(qmodel, "model.packed.safetensors", meta)   # int codes bit-packed, steps, JSON metadata
    model = load_packed("model.packed.safetensors")          # dequantized weights bit-identical
    export_onnx(qmodel, "model.onnx", opset=21)              # runs on onnxruntime (CPU)

``onnx`` is imported only by the ONNX functions (optional extra ``mergeq[deploy]``).
"""
from .onnx_export import export_onnx, ort_session, to_onnx, weight_storage
from .pack import ExportError, pack, packed_size, unpack
from .packed import check_exportable, load_packed, read_packed_metadata, save_packed

__all__ = ["ExportError", "check_exportable", "export_onnx", "load_packed", "ort_session", "pack", "packed_size",
           "read_packed_metadata", "save_packed", "to_onnx", "unpack", "weight_storage"]
