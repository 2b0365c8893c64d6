"""The uniform integer grid as a registered format: ``--format int`` (the default).

A layer on it stores uint8 codes ``Z`` ``(rows, cols)`` and float32 per-(row, group) ``scale``/``zero``
``(rows, n_groups)``, and decodes as

    W_hat[r, c] = scale[r, g] * (Z[r, c] - zero[r, g]),    g = c // group_size

(one group per row when ``group_size <= 0``; the last group of a row is narrower when ``group_size`` does not
divide the width), :func:`turboboa.grids.dequantize_weight`. Its parameters are the run's and are stored on
each layer: ``bits`` (codes in ``0..2^bits - 1``), ``group_size`` and ``sym`` (``zero = 2^(bits-1)``). The
solvers fit it through :class:`turboboa.grids.GridSpec`. No ggml type stores it; ONNX QDQ writes the codes,
scales and zero points as they are (``onnx_encoding = "uniform"``).
"""

from __future__ import annotations

import torch

from turboboa.errors import UserError
from turboboa.formats.registry import Format, GridParams, StoredLayer
from turboboa.grids import GridSpec, dequantize_weight

UNIFORM = "int"  # the name QDIRs store for layers on this grid


class UniformFormat(Format, name=UNIFORM):
    """The uniform grid of the run's ``--bits``/``--group-size``/``--sym``, read from each layer."""

    configurable = True
    onnx_encoding = "uniform"

    @classmethod
    def grid_params(cls, bits: int, group_size: int, sym: bool) -> GridParams:
        """The grid is the run's (or the layer's): ``(bits, group_size, sym)`` as given."""
        return GridParams(bits, group_size, sym)

    @classmethod
    def solver_grid(cls, bits: int, group_size: int, sym: bool, search: bool) -> tuple[GridSpec, int]:
        """``GridSpec(bits, sym, search)`` and the run's group size."""
        return GridSpec(bits=bits, sym=sym, search=search), group_size

    @classmethod
    def dequantize_layer(cls, layer: StoredLayer) -> torch.Tensor:
        """``W_hat[r, c] = scale[r, g] * (codes[r, c] - zero[r, g])``, ``g = c // layer.group_size``
        (:func:`turboboa.grids.dequantize_weight`; float32)."""
        return dequantize_weight(layer.codes, layer.scale, layer.zero, layer.group_size)

    @classmethod
    def check_columns(cls, columns: int, group_size: int, where: str) -> None:
        """A row must hold at least one whole group: a ``group_size`` wider than ``columns`` is an error (a
        narrower last group is fine, as GPTQ has it)."""
        if 0 < group_size and group_size > columns:
            raise UserError(
                f"--group-size {group_size} is wider than the input width {columns} of {where}; choose a group "
                "size of at most the smallest layer width, or -1 for per-channel grids")

    @classmethod
    def gguf_refusal(cls, source: str, layer: str) -> str:
        """No ggml type stores the uniform grid: quantize onto a ggml type instead."""
        return (f"{source} holds layers on turboboa's uniform grid (e.g. {layer}), which no ggml type stores; "
                f"quantize with --format (q4_k, q4_0, iq4_nl, ...) to export GGUF")
