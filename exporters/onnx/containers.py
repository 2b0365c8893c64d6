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
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto


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
