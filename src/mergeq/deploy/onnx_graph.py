"""An ONNX graph under construction: nodes and initializers with unique names (``onnx.helper``)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (QLinearAdd, MatMulIntegerToFloat, MatMulNBits)


def f32(x: float) -> np.ndarray:
    return np.array(x, dtype=np.float32)


class Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, opset: int, int4: bool, input_name: str = "input") -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.TP = helper, numpy_helper, TensorProto
        self.opset, self.int4, self.input_name = opset, int4, input_name
        self.nodes: list = []
        self.inits: list = []
        self.domains: set[str] = set()
        self.static_input = False  # a node was built for the traced input size (reshape targets)
        self._names: set[str] = set()
        self._batch: str | None = None

    def reserve(self, names: Sequence[str]) -> None:
        """Keep ``names`` (the traced nodes' outputs) out of :meth:`name`'s choices."""
        self._names.update(names)

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def int_codes(self, base: str, codes: np.ndarray, use_int4: bool) -> str:
        """Signed integer codes as an INT8 or (two per byte) INT4 initializer."""
        name = self.name(base)
        if not use_int4:
            self.inits.append(self.numpy_helper.from_array(codes.astype(np.int8), name))
            return name
        nib = (codes.astype(np.int8).flatten() & 0xF).astype(np.uint8)
        nib = np.concatenate([nib, np.zeros(len(nib) % 2, np.uint8)])
        raw = (nib[0::2] | (nib[1::2] << 4)).tobytes()  # element 0 in the low nibble
        self.inits.append(self.helper.make_tensor(name, self.TP.INT4, codes.shape, raw, raw=True))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, domain: str = "",
           **attrs: Any) -> str:
        out = out or self.name(op_type.lower())
        if domain:
            self.domains.add(domain)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=self.name(f"{out}_node"),
                                                domain=domain or None, **attrs))
        return out

    def batch(self) -> str:
        """An int64 ``[1]`` tensor holding the input's batch size (built once)."""
        if self._batch is None:
            shape = self.op("Shape", [self.input_name], self.name("input_shape"))
            self._batch = self.op("Slice", [shape, self.const("zero", np.array([0], np.int64)),
                                            self.const("one", np.array([1], np.int64))], self.name("batch"))
        return self._batch
