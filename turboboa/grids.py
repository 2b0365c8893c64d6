"""Uniform integer grids: choosing a scale and zero point, rounding onto the grid, and the one dequantizer.

A grid with ``b`` bits stores integer codes ``z`` in ``[0, 2^b - 1]`` and represents the weight

    w_hat = s * (z - z0)

with a float32 scale ``s`` and a zero point ``z0`` (an integer; ``2^(b-1)`` for symmetric grids). Every
consumer of a quantized checkpoint (fake-quant model, exporters, checker) calls :func:`dequantize` so
that all of them see bit-identical weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GridSpec:
    """How a grid is chosen: ``bits``, symmetric or not, and min-max or a weighted range search."""

    bits: int
    sym: bool = False
    search: bool = False
    search_steps: int = 100

    vector_width = 1  # columns one code covers
    span = 1  # columns whose codes constrain each other

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def fit_width(self, group_size: int, columns: int) -> int:
        """Columns whose grid is fixed together: one group (the whole row when per channel)."""
        return group_size if group_size > 0 else columns

    def for_rows(self, W: torch.Tensor, H: torch.Tensor | None = None) -> GridSpec:
        """The grid with its row-level parameters fixed from whole rows ``W`` (called at a row's first
        column): a uniform grid has none, so ``self``."""
        return self

    def fit(self, w: torch.Tensor, H_block: torch.Tensor | None = None) -> BlockGrid:
        """Grid of each row of ``w`` (``(B, R, G)``), the range search weighted by ``H_block`` (``(B|1, G, G)``):
        the full block up to :data:`FULL_BLOCK_SEARCH_MAX` columns, its diagonal beyond."""
        if not self.search or H_block is None:
            s, z = fit_grid(w, self)
        elif w.shape[-1] <= FULL_BLOCK_SEARCH_MAX:
            s, z = fit_grid(w, self, h_full=H_block)
        else:
            s, z = fit_grid(w, self, h_diag=torch.diagonal(H_block, dim1=-2, dim2=-1)[:, None, :])
        return BlockGrid(s.unsqueeze(-1), z.unsqueeze(-1))

    def round(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes ``clamp(round(w / s) + z0, 0, maxq)`` (float)."""
        return quantize_codes(w, scale, zero, self.maxq)

    def nearest(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                H: torch.Tensor | None = None) -> torch.Tensor:
        """RTN's codes: :meth:`round` of every weight."""
        return self.round(W, scale, zero)

    def value(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``s * (z - z0)``: :func:`dequantize`."""
        return dequantize(codes, scale, zero)

    # ------------------------------------------------------------------- continuous parameters (F3)
    def linear_params(self, codes: torch.Tensor, grid: BlockGrid, group_size: int) -> LinearParams:
        """With the codes fixed, ``W_hat[r, c] = s[r, g(c)] * (Z[r, c] - z0[r, g(c)])`` is linear in the scales:
        one parameter per (row, group), ``theta = s`` (``(B, R, 1, n_groups)``), basis ``Phi = Z - z0`` on the
        group's columns (``span = G``; the whole row per channel; a ragged last group is narrower)."""
        C = codes.shape[-1]
        Phi = codes - expand_groups(grid.offset, group_size, C)
        return LinearParams(grid.scale.unsqueeze(2), Phi.unsqueeze(2), self.fit_width(group_size, C),
                            exact_steps=True, residual_first=True)

    def store(self, theta: torch.Tensor) -> torch.Tensor:
        """The scales as stored: unrounded (float32, float64 in exact tests)."""
        return theta

    def valid(self, theta: torch.Tensor) -> torch.Tensor:
        """Every scale is acceptable."""
        return torch.ones_like(theta, dtype=torch.bool)

    def with_params(self, grid: BlockGrid, theta: torch.Tensor, group_size: int) -> BlockGrid:
        """``grid`` with the scales ``theta`` (``(B, R, 1, n_groups)``, as :meth:`store` gives them)."""
        return BlockGrid(theta[:, :, 0], grid.offset)

    def decode(self, codes: torch.Tensor, grid: BlockGrid, group_size: int) -> torch.Tensor:
        """``W_hat`` of ``codes`` (``(B, R, C)``) on ``grid``: :func:`dequantize_weight`."""
        return dequantize_weight(codes, grid.scale, grid.offset, group_size)

    def linear_fields(self, grid: BlockGrid, d_out: int, group_size: int) -> dict[str, Any]:
        """The fields of a ``QuantizedLinear`` (besides its codes) for ``grid`` (``(B, R, n_groups)``, ``B R =
        d_out``): float32 per-(row, group) scale and zero point, bits, group size, symmetry."""
        return {"scale": grid.scale.reshape(d_out, -1).float().cpu().contiguous(),
                "zero": grid.offset.reshape(d_out, -1).float().cpu().contiguous(),
                "bits": self.bits, "group_size": group_size, "sym": self.sym}


# Range search weights errors by the full diagonal block H_gg up to this group width, by diag(H) beyond.
FULL_BLOCK_SEARCH_MAX = 256


@dataclass(frozen=True)
class BlockGrid:
    """Grids fixed together: per-(row, group) ``scale`` and ``offset`` (``(B, R, n_groups)``; the zero point
    for :class:`GridSpec`) and, for a storage format, the fields it stores (``stored``; None otherwise)."""

    scale: torch.Tensor
    offset: torch.Tensor
    stored: Any = None

    def rows(self, rows: slice) -> BlockGrid:
        """The grids of rows ``rows`` (dim 1) of every field, the stored ones included."""
        stored = None
        if self.stored is not None:
            stored = type(self.stored)(**{k: None if v is None else v[:, rows] for k, v in vars(self.stored).items()})
        return BlockGrid(self.scale[:, rows], self.offset[:, rows], stored)


@dataclass(frozen=True)
class LinearParams:
    """A grid's continuous parameters with its codes (and integer sub-scales) fixed, on which ``W_hat`` is
    linear: parameter ``t`` of span ``k`` covers columns ``[k span, (k + 1) span)`` of its row and

        W_hat[r, c] = sum_t theta[r, t, k(c)] * Phi[r, t, c],    k(c) = c // span

    (exactly in real arithmetic; the grid's own decoder gives the stored float values). ``theta``:
    ``(B, R, T, n_spans)``, ``Phi``: ``(B, R, T, C)``; the last span may be narrower than ``span``.

    ``exact_steps``: the grid stores its parameters as computed and constrains none (the uniform grid's
    float scales), so every refinement step is an exact minimization and is kept as it is; otherwise (fp16
    super-scales, LPBQ's positive ``s_r``) a stored step is kept only where it is valid and lowers the
    objective. ``residual_first`` picks the order in which the refinement forms its right-hand side
    ``Phi H v``: ``Phi (H v)`` (the uniform grid's) or ``(Phi H) v`` (the formats'); the same vector, the
    order kept per grid so that each grid's refined values stay bit-identical to the earlier solvers.
    """

    theta: torch.Tensor
    Phi: torch.Tensor
    span: int
    exact_steps: bool = False
    residual_first: bool = False


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``w_hat = s * (z - z0)`` in float32 (float64 when the scale is float64, for exact tests).

    ``scale`` and ``zero`` broadcast against ``codes``.
    """
    dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
    return scale.to(dtype) * (codes.to(dtype) - zero.to(dtype))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``z = clamp(round(w / s) + z0, 0, maxq)`` (float tensor holding integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a grid covering ``[xmin, xmax]`` (which contains 0).

    Asymmetric: ``s = (xmax - xmin) / maxq``, ``z0 = round(-xmin / s)``.
    Symmetric: ``s = 2 max(|xmin|, xmax) / maxq``, ``z0 = (maxq + 1) / 2``.
    An empty range (all-zero weights) gets ``s = 1``: every code then decodes to exactly 0.
    """
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def fit_minmax(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of each row of ``w`` (``(..., G)`` -> scale, zero of shape ``(...)``); the range includes 0."""
    xmin = torch.clamp(w.amin(dim=-1), max=0)
    xmax = torch.clamp(w.amax(dim=-1), min=0)
    return _params_from_range(xmin, xmax, spec)


def fit_grid(
    w: torch.Tensor,
    spec: GridSpec,
    h_diag: torch.Tensor | None = None,
    h_full: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of each row of ``w`` (``(..., G)``): min-max, or the Hessian-weighted range search.

    The search shrinks the min-max range by factors ``p`` in ``(0, 1]`` at resolution ``1 / search_steps`` and
    keeps, per row, the candidate with the smallest error ``(q - w) H_gg (q - w)^T``, with ``H_gg`` given either
    as its diagonal ``h_diag`` (broadcastable to ``w``) or as the full block ``h_full`` (``(..., G, G)``,
    batched like ``w`` without its row dimension). Without either, the unweighted squared error is used.
    It is coarse to fine: ``p = 1 - i / 20`` first, then the ``1 / search_steps`` neighbours of each row's
    best coarse factor (28 candidates instead of 100 for the same resolution around the optimum), each stage
    evaluated as one batched tensor operation.
    """
    if not spec.search:
        return fit_minmax(w, spec)
    xmin = torch.clamp(w.amin(dim=-1), max=0)
    xmax = torch.clamp(w.amax(dim=-1), min=0)
    h = h_diag if h_diag is not None else torch.ones(w.shape[-1], dtype=w.dtype, device=w.device)

    def error(p: torch.Tensor) -> torch.Tensor:
        """Candidates ``p`` (``(P, ...)``, one factor per row) -> their errors, in one batch."""
        scale, zero = _params_from_range(p * xmin, p * xmax, spec)
        d = dequantize(quantize_codes(w, scale[..., None], zero[..., None], spec.maxq), scale[..., None], zero[..., None]) - w
        return ((d @ h_full) * d).sum(-1) if h_full is not None else (d * d * h).sum(-1)

    best_p = shrink_search(error, torch.ones_like(xmin), spec.search_steps, w.numel())
    return _params_from_range(best_p * xmin, best_p * xmax, spec)


def expand_groups(params: torch.Tensor, group_size: int, columns: int) -> torch.Tensor:
    """Per-(row, group) parameters ``(..., n_groups)`` repeated to per-(row, column) ``(..., columns)``."""
    if group_size <= 0:
        return params[..., :1].expand(*params.shape[:-1], columns)
    return params.repeat_interleave(group_size, dim=-1)[..., :columns]


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fake-quant weight ``W_hat[r, c] = s[r, g(c)] * (Z[r, c] - z0[r, g(c)])`` with ``g(c) = c // G``."""
    columns = codes.shape[-1]
    return dequantize(codes, expand_groups(scale, group_size, columns), expand_groups(zero, group_size, columns))


def shrink_search(error: Callable[[torch.Tensor], torch.Tensor], ones: torch.Tensor, steps: int = 100,
                  elements: int = 1, coarse: int = 20) -> torch.Tensor:
    """The shrink factor ``p`` in ``(0, 1]`` of smallest ``error(p)`` for every row, at resolution ``1 / steps``.

    Coarse to fine: ``p = 1 - i / coarse`` first, then the ``1 / steps`` neighbours of each row's best coarse
    factor (28 candidates instead of 100 for the same resolution around the optimum). ``error`` maps stacked
    candidates ``(P, *ones.shape)`` to their errors; candidates are batched so that one batch stays under
    ~64M elements when each candidate costs ``elements``.
    """
    chunk = max(1, (1 << 26) // max(1, elements))

    def search(ps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        best_p = best_err = None
        for c0 in range(0, len(ps), chunk):
            p = torch.stack(ps[c0 : c0 + chunk])
            err = error(p)
            idx = err.argmin(dim=0, keepdim=True)
            p1, e1 = p.gather(0, idx)[0], err.gather(0, idx)[0]
            if best_p is None:
                best_p, best_err = p1, e1
            else:
                better = e1 < best_err
                best_p, best_err = torch.where(better, p1, best_p), torch.where(better, e1, best_err)
        return best_p, best_err

    p1, e1 = search([ones * (1.0 - i / coarse) for i in range(coarse)])
    step = 1.0 / steps
    span = int(round(steps / coarse)) - 1
    p2, e2 = search([torch.clamp(p1 + j * step, step, 1.0) for j in range(-span, span + 1) if j != 0])
    return torch.where(e2 < e1, p2, p1)
