"""Integer containers for quantized weights: which ONNX element type holds a ``b``-bit code, with or without
a zero point.

A uniform ``b``-bit grid decodes ``w = s * (z - z0)`` with integer codes ``z`` in ``[0, 2^b - 1]`` and an
integer zero point ``z0``. DequantizeLinear computes ``y = (x - zp) * s``, so either

* ``x = z`` and ``zp = z0`` (an unsigned container with a zero point, for asymmetric grids), or
* ``x = z - z0`` and no zero point (a signed container; exact because ``z - z0`` is an integer).

Both give ``y`` equal to ``s * (z - z0)`` bit for bit in float32 (one rounding of an exact integer times ``s``).
``z - z0`` lies in ``[-(2^b - 1), 2^b - 1]``: for 2 and 3 bits that fits int4, so those widths need no zero
point at all (what NPU toolchains ask for); for symmetric grids (``z0 = 2^(b-1)``) it is ``[-2^(b-1),
2^(b-1) - 1]``, the signed type of the same width.

A storage format is decoded the same way when it is a ggml type with ``w = scale_g * level[code]``, no offset
and consecutive integer levels (q4_0, q5_0, q8_0, q3_k, q6_k): ``x = level[code]`` (``q - 8``, ``q - 16``,
``q - 128``, ``q - 4``, ``q - 32``) in the narrowest signed container holding the levels
(:func:`level_container`), no zero point, and ``s = scale_g`` (``d``, or the exact product ``fp32(d * sc_g)``
of the k-quants). Types with a float offset (q4_1, q5_1, q2_k, q4_k, q5_k: ``w = s*q - o``, ``o / s`` not an
integer) or non-uniform levels (iq4_nl) have no such form.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
from onnx import TensorProto

from turboboa.formats import format_names, get_format, is_ggml_format


@dataclass(frozen=True)
class Container:
    """An ONNX integer element type for weights: its name, ``TensorProto`` code, numpy dtype, value range, and
    whether it carries a zero point (``x = z``, ``zp = z0``) or the zero-free difference (``x = z - z0``)."""

    name: str
    onnx_type: int
    dtype: np.dtype
    lo: int
    hi: int
    zero_point: bool
    min_opset: int = 21

    @property
    def label(self) -> str:
        """``uint4+zp`` or ``int4``: the container and whether a zero point is stored."""
        return f"{self.name}+zp" if self.zero_point else self.name


INT8 = Container("int8", TensorProto.INT8, np.dtype(np.int8), -128, 127, False)
UINT8 = Container("uint8", TensorProto.UINT8, np.dtype(np.uint8), 0, 255, True)
INT4 = Container("int4", TensorProto.INT4, np.dtype(ml_dtypes.int4), -8, 7, False)
UINT4 = Container("uint4", TensorProto.UINT4, np.dtype(ml_dtypes.uint4), 0, 15, True)
INT2 = Container("int2", TensorProto.INT2, np.dtype(ml_dtypes.int2), -2, 1, False, min_opset=25)
UINT2 = Container("uint2", TensorProto.UINT2, np.dtype(ml_dtypes.uint2), 0, 3, True, min_opset=25)

# (bits, symmetric) -> container. Asymmetric 2/3-bit grids store z - z0 in int4 (exact, no zero point).
PORTABLE = {
    (8, True): INT8, (8, False): UINT8,
    (4, True): INT4, (4, False): UINT4,
    (3, True): INT4, (3, False): INT4,
    (2, True): INT4, (2, False): INT4,
}
# 2-bit grids in the native 2-bit types (DequantizeLinear-25 and later; onnxruntime CPU runs them).
NATIVE_INT2 = {(2, True): INT2, (2, False): UINT2}


def container_for(bits: int, sym: bool, native_int2: bool = False) -> Container:
    """The container of a ``bits``-bit grid: :data:`NATIVE_INT2` for 2 bits when allowed, else :data:`PORTABLE`."""
    if native_int2 and (bits, sym) in NATIVE_INT2:
        return NATIVE_INT2[(bits, sym)]
    return PORTABLE[(bits, sym)]


def signed_container(lo: int, hi: int) -> Container | None:
    """The narrowest portable signed container (int4, then int8) holding every integer of ``[lo, hi]``;
    None when neither does."""
    for container in (INT4, INT8):
        if container.lo <= lo and hi <= container.hi:
            return container
    return None


def level_container(fmt: str) -> Container | None:
    """The container of the ggml type ``fmt`` when DequantizeLinear decodes it exactly, else None.

    That is when ``w = scale_g * level[code]`` with no offset (a symmetric type) and ``level[code] = l_0 +
    code`` consecutive integers: ``x = level[code]`` in :func:`signed_container` of ``[l_0, l_max]``, no zero
    point, so ``(x - 0) * scale_g`` is ggml's ``fp32(scale_g * level)``. None for LPBQ and the uniform grid
    (their own containers), for types with a float offset and for non-uniform levels (iq4_nl).
    """
    if not is_ggml_format(fmt):
        return None
    f = get_format(fmt)
    levels = f.levels
    consecutive = torch.equal(levels, levels[0] + torch.arange(levels.numel(), dtype=levels.dtype))
    if f.asymmetric or not consecutive:
        return None
    return signed_container(int(levels[0]), int(levels[-1]))


# ggml types an ONNX DequantizeLinear decodes exactly (q4_0, q5_0, q8_0, q3_k, q6_k), in registration order.
LEVEL_FORMATS = tuple(name for name in format_names() if level_container(name) is not None)
