"""Dense bit-stream packing of b-bit integer codes (b = 2..8) into bytes.

``n`` codes of ``b`` bits take exactly ``ceil(n * b / 8)`` bytes. Signed codes in
``[-2^(b-1), 2^(b-1) - 1]`` are offset by ``2^(b-1)`` to ``[0, 2^b - 1]`` first. Bits are laid out
least significant first: code ``i`` occupies stream bits ``i*b .. i*b + b - 1`` and stream bit ``k``
is bit ``k % 8`` of byte ``k // 8``. So int8 is one code per byte and int4 is two per byte (low
nibble first), while int3 and int2 cross byte boundaries without wasting bits. Padding bits in
the last byte are zero; :func:`unpack` refuses a stream whose padding is not. The bit stream
is ``numpy.unpackbits``/``packbits`` with ``bitorder="little"`` (codes fit a byte, 2..8 bits).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError, MergeqError
from ..quant import check_bits, qrange


class ExportError(MergeqError):
    """A model that cannot be exported: not quantized, not calibrated, or off its grid."""


def packed_size(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return (n * check_bits(bits, "packed bits") + 7) // 8


def pack(codes: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, flattened) into a 1-D uint8 tensor of ``packed_size`` bytes.

    Raises :class:`BitWidthError` for ``bits`` outside 2..8 and :class:`ExportError` for a
    non-integer tensor or a code outside the ``bits``-bit range.
    """
    check_bits(bits, "packed bits")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ExportError(f"pack needs an integer tensor, got {codes.dtype}")
    lo, hi = qrange(bits, signed)
    flat = codes.detach().cpu().flatten().to(torch.int64)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        kind = "signed" if signed else "unsigned"
        raise ExportError(f"codes span [{int(flat.min())}, {int(flat.max())}], outside the {kind} "
                          f"{bits}-bit range [{lo}, {hi}]")
    u = (flat - lo).numpy().astype(np.uint8)  # offset 2^(b-1) for signed codes, 0 for unsigned
    bits_lsb_first = np.unpackbits(u[:, None], axis=1, count=bits, bitorder="little")  # [n, bits]
    return torch.from_numpy(np.packbits(bits_lsb_first.ravel(), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, n: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes (int64, 1-D).

    Raises :class:`CheckpointError` if ``packed`` is not a 1-D uint8 tensor of exactly
    ``ceil(n * bits / 8)`` bytes or its padding bits are not zero.
    """
    check_bits(bits, "packed bits")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CheckpointError(f"code count must be a non-negative integer, got {n!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CheckpointError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape "
                              f"{tuple(packed.shape)}")
    want = packed_size(n, bits)
    if packed.numel() != want:
        raise CheckpointError(f"{n} codes of {bits} bits need {want} bytes, found {packed.numel()}")
    stream = np.unpackbits(packed.cpu().numpy(), bitorder="little")
    if stream[n * bits:].any():
        raise CheckpointError(f"padding bits after the {n} packed {bits}-bit codes are not zero")
    u = np.packbits(stream[: n * bits].reshape(n, bits), axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(u.astype(np.int64)) + qrange(bits, signed)[0]
