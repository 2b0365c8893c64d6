"""``FormatSpec``: a ggml type as the grid a solver quantizes onto (fit, snap, round, decode).

The solvers see every grid through the same four operations (``turboboa.grids.GridSpec`` is the uniform
integer grid, this is the ggml one):

* ``fit_width(group_size, C)``: how many columns are fixed together when the solver reaches their first column.
  For a ggml type that is its block (32 columns, or the 256-column super-block of the k-quants): the block's
  fp16 super-scale ``d`` (and ``dmin``) bounds every sub-scale of the block, so it must exist before the codes
  of the block's first group are chosen.
* ``fit(w, H_block)``: the stored grid of those columns, chosen from the weights as they are at that moment
  (under GPTQ, the weights already compensated for every earlier column), and the exact per-group
  ``(scale_g, offset_g)`` it implies.
* ``round(w, s, o)``: the code of the nearest representable value; ``value(c, s, o) = s * levels[c] - o``
  in float32, the same expression and order as ggml's dequantizer, so the solver's ``Q`` is bit-identical to
  what llama.cpp decodes from the packed file.

How the block grid is chosen. Per group ``g`` of the block, a continuous scale and offset are searched:
symmetric types map the group's signed largest-magnitude weight ``a`` to the most negative level ``l_0``
(``s = p a / l_0``), asymmetric ones cover ``[p min, p max]`` (``s = p (max - min) / (L - 1)``, ``o = -p min``),
with the shrink factor ``p`` in ``(0, 1]`` minimising the error ``sum_c h_c (q_c - w_c)^2`` weighted by the
diagonal of the layer Hessian (coarse-to-fine, as :func:`turboboa.grids.fit_grid`). The format then snaps the
continuous values onto what the block stores (:meth:`GgmlFormat.snap`: fp16 super-scale, integer sub-scales).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from turboboa.formats.fields import GgmlGrid
from turboboa.formats.registry import get_format
from turboboa.grids import BlockGrid, LinearParams, shrink_search

if TYPE_CHECKING:
    from turboboa.formats.base import BlockFormat

FINE_STEPS = 100


def map_grid(grid: GgmlGrid, fn: Callable[[torch.Tensor], torch.Tensor]) -> GgmlGrid:
    """``grid`` with ``fn`` applied to every stored field (absent fields stay None)."""
    return GgmlGrid(**{k: None if v is None else fn(v) for k, v in vars(grid).items()})


def reshape_grid(grid: GgmlGrid, *shape: int) -> GgmlGrid:
    """Every field of ``grid`` reshaped to ``(*shape, -1)``."""
    return map_grid(grid, lambda t: t.reshape(*shape, -1))


def cat_grids(grids: list[GgmlGrid], dim: int = -1) -> GgmlGrid:
    """Grids of consecutive column ranges (``dim=-1``) or row blocks (``dim=1``) joined along ``dim``."""
    keys = [k for k, v in vars(grids[0]).items() if v is not None]
    return GgmlGrid(**{k: torch.cat([getattr(g, k) for g in grids], dim=dim) for k in keys})


def gather_grid_rows(grid: GgmlGrid, index: torch.Tensor) -> GgmlGrid:
    """Rows of every field reordered along dim 1: ``field[b, index[b], :]`` (``index``: ``(B, R)``)."""
    return map_grid(grid, lambda t: torch.gather(t, 1, index.unsqueeze(-1).expand(*index.shape, t.shape[-1])))


def grouped(w: torch.Tensor, H_block: torch.Tensor | None, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``(B, R, W)`` as float32 groups ``(B, R, W/G, G)``, and the search weights ``h_c = H_cc`` of each
    column in the same layout (``(B|1, 1, W/G, G)``; all ones without ``H_block``)."""
    B, R, W = w.shape
    wg = w.to(torch.float32).reshape(B, R, W // G, G)
    if H_block is None:
        return wg, torch.ones(1, 1, 1, G, dtype=wg.dtype, device=w.device)
    return wg, torch.diagonal(H_block, dim1=-2, dim2=-1).to(wg.dtype).reshape(-1, 1, W // G, G)


@functools.cache
def _first_level(fmt: type[BlockFormat]) -> float | None:
    """``l_0`` when the levels are consecutive integers (``levels[c] = l_0 + c``, every type but IQ4_NL),
    else None."""
    lv = fmt.levels
    uniform = torch.equal(lv, lv[0] + torch.arange(lv.numel(), dtype=lv.dtype))
    return float(lv[0]) if uniform else None


@dataclass(frozen=True)
class FormatSpec:
    """A ggml type as a solver's grid; ``search`` picks the weighted range search over the plain range."""

    fmt_name: str
    search: bool = True

    @property
    def fmt(self) -> type[BlockFormat]:
        return get_format(self.fmt_name)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    vector_width = 1  # columns one code covers (a codebook's dim, :mod:`turboboa.formats.codebook`)
    span = 1  # columns whose codes constrain each other (kept together under act-order)

    def fit_width(self, group_size: int, columns: int) -> int:
        """Columns fixed together: one ggml block."""
        return self.fmt.block_size

    def for_rows(self, W: torch.Tensor, H: torch.Tensor | None = None) -> FormatSpec:
        """The grid with its row-level parameters fixed from whole rows ``W`` (``(B, R, C)``), called when a
        solver reaches a row's first column. ggml types have none (each block is self-contained): ``self``."""
        return self

    def groups(self, columns: int) -> int:
        """Groups of a row of ``columns`` columns."""
        return columns // self.fmt.group_size

    # ------------------------------------------------------------------------------------------ fit
    def candidates(self, w: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous per-group (scale, offset) for shrink factors ``p`` (``(P, 1, ...)``) of groups ``w``
        (``(..., G)``): returns tensors ``(P, ...)``."""
        fmt = self.fmt
        levels = fmt.levels
        if fmt.asymmetric:
            xmin = w.amin(-1).clamp(max=0)
            xmax = w.amax(-1).clamp(min=0)
            scale = p * (xmax - xmin) / float(levels[-1] - levels[0])
            offset = -p * xmin + scale * float(levels[0])
            return scale, offset
        idx = w.abs().argmax(-1, keepdim=True)
        anchor = w.gather(-1, idx).squeeze(-1)
        return p * anchor / float(levels[0]), torch.zeros_like(p * anchor)

    def _group_error(self, w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor,
                     offset: torch.Tensor) -> torch.Tensor:
        """``sum_c h_c (q_c - w_c)^2`` per group for candidate grids (``(P, ...)``) of groups ``w``."""
        s, o = scale.unsqueeze(-1), offset.unsqueeze(-1)
        l0 = _first_level(self.fmt)
        if l0 is not None and type(self).round is FormatSpec.round and type(self).value is FormatSpec.value:
            return self._uniform_group_error(w, h, s, o, l0)
        if l0 is None:  # the bracketing search of IQ4_NL wants full-size operands
            s = s.expand(*scale.shape, w.shape[-1])
            o = o.expand_as(s)
            w = w.expand_as(s)
        q = self.value(self.round(w, s, o), s, o)
        return ((q - w) ** 2 * h).sum(-1)

    def _uniform_group_error(self, w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, o: torch.Tensor,
                             l0: float) -> torch.Tensor:
        """:meth:`_group_error` of consecutive integer levels in one buffer: ``q = s clamp(round((w + o) / s),
        l_0, l_0 + L - 1) - o`` is :meth:`value` of :meth:`round`, the same float32 operations in the same order
        (where ``s = 0``, ``q = -o`` either way), so the errors are bit-identical; the search's many candidates
        then cost one allocation each instead of nine."""
        q = (w + o).div_(s.masked_fill(s == 0, 1.0)).round_().clamp_(l0, l0 + self.fmt.code_max())
        q.mul_(s).sub_(o).sub_(w).square_()
        if q.shape != torch.broadcast_shapes(q.shape, h.shape):
            return (q * h).sum(-1)
        return q.mul_(h).sum(-1)

    def continuous(self, wg: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best continuous (scale, offset) of each group of ``wg`` (``(..., G)``), weights ``h`` (broadcastable)."""
        one = torch.ones(wg.shape[:-1], dtype=wg.dtype, device=wg.device)
        if not self.search:
            s, o = self.candidates(wg, one.unsqueeze(0))
            return s[0], o[0]
        def error(p: torch.Tensor) -> torch.Tensor:
            s, o = self.candidates(wg, p)
            return self._group_error(wg, h, s, o)

        p = shrink_search(error, one, FINE_STEPS, wg.numel())
        s, o = self.candidates(wg, p.unsqueeze(0))
        return s[0], o[0]

    def fit(self, w: torch.Tensor, H_block: torch.Tensor | None = None) -> BlockGrid:
        """Stored grid of ``w`` (``(B, R, W)``, ``W`` whole blocks); ``H_block`` (``(B|1, W, W)``) weights the
        search by its diagonal."""
        fmt = self.fmt
        B, R, W = w.shape
        G = fmt.group_size
        ng = W // G
        wg, h = grouped(w, H_block, G)
        scale, offset = self.continuous(wg, h)
        offset = offset if fmt.asymmetric else None
        stored = fmt.snap(scale.reshape(B * R, ng), None if offset is None else offset.reshape(B * R, ng))
        s, o = fmt.group_scale_offset(stored)
        return BlockGrid(s.reshape(B, R, ng), o.reshape(B, R, ng), reshape_grid(stored, B, R))

    # ------------------------------------------------------------------------------------------ use
    def round(self, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Codes (float) of the values nearest to ``w``; ``scale``/``offset`` have ``w``'s shape.

        For the uniform level tables (every type but IQ4_NL) this is ``clamp(round((w + o) / s) - l_0)``, a few
        tensor operations per GPTQ column; the exact bracketing search of :meth:`GgmlFormat.quantize_codes`
        handles IQ4_NL. (Either way ``Q`` is ``value(codes)``, so the export is exact.)
        """
        fmt = self.fmt
        l0 = _first_level(fmt)
        if l0 is None:
            return fmt.quantize_codes(w, scale, offset).to(w.dtype)
        dead = scale == 0
        t = torch.round((w + offset) / scale.masked_fill(dead, 1.0)) - l0
        return t.masked_fill_(dead, 0.0).clamp_(0, fmt.code_max())

    def nearest(self, W: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                H: torch.Tensor | None = None) -> torch.Tensor:
        """RTN's codes: every weight of ``W`` rounded on its own (:meth:`round`; ``H`` is not needed)."""
        return self.round(W, scale, offset)

    def value(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``fp32(scale * levels[code]) - offset``: ggml's dequantizer (float32). For consecutive integer
        levels ``levels[code] = code + l_0`` exactly, so no table lookup is needed."""
        l0 = _first_level(self.fmt)
        lv = self.fmt.levels_on(codes.device)[codes.long()] if l0 is None else codes.to(torch.float32) + l0
        return scale.to(torch.float32) * lv - offset.to(torch.float32)


    # ------------------------------------------------------------------- continuous parameters (F3)
    def param_span(self, columns: int) -> int:
        """Columns one continuous parameter covers: a block (``d``, ``dmin``), or the whole row for a per-row
        scale (LPBQ's ``s_r``)."""
        return columns if self.fmt.row_scale else self.fmt.block_size

    def linear_params(self, codes: torch.Tensor, grid: BlockGrid, group_size: int) -> LinearParams:
        """With the codes and integer sub-scales fixed, ``W_hat`` is linear in the super-scale ``d`` (basis
        ``Phi_0 = sc_g * levels[code]``) and, for the asymmetric types, the super-min ``dmin`` (``Phi_1 =
        -m_g``; Q4_1's stored min gives ``+1``), one of each per :meth:`param_span`. The bases are read off
        ``group_scale_offset`` at unit parameters, so they hold for every format. ``codes``: ``(B, R, C)``;
        ``theta``: ``(B, R, T, n_spans)``."""
        fmt = self.fmt
        B, R, C = codes.shape
        per = self.param_span(C) // fmt.block_size  # stored blocks per parameter (LPBQ repeats s_r per block)
        flat = reshape_grid(grid.stored, B * R)
        lv = fmt.levels_on(codes.device)[codes.reshape(B * R, C).long()]
        ones, zeros = torch.ones_like(flat.d), torch.zeros_like(flat.d)
        unit_d = GgmlGrid(d=ones, dmin=None if flat.dmin is None else zeros, sc=flat.sc, m=flat.m)
        s1, _ = fmt.group_scale_offset(unit_d)
        bases = [s1.repeat_interleave(fmt.group_size, -1)[:, :C] * lv]
        params = [flat.d]
        if flat.dmin is not None:
            _, o1 = fmt.group_scale_offset(GgmlGrid(d=zeros, dmin=ones, sc=flat.sc, m=flat.m))
            bases.append(-o1.repeat_interleave(fmt.group_size, -1)[:, :C])
            params.append(flat.dmin)
        theta = torch.stack([t[:, ::per] for t in params], 1)
        return LinearParams(theta.reshape(B, R, len(params), -1), torch.stack(bases, 1).reshape(B, R, -1, C),
                            self.param_span(C))

    def store(self, theta: torch.Tensor) -> torch.Tensor:
        """Continuous parameters as the block stores them (``fmt.store_scale``: fp16 for ggml, fp32 for LPBQ)."""
        return self.fmt.store_scale(theta)

    def valid(self, theta: torch.Tensor) -> torch.Tensor:
        """Where a stored parameter is acceptable (``fmt.valid_scale``: finite; LPBQ's ``s_r`` also positive)."""
        return self.fmt.valid_scale(theta)

    def with_params(self, grid: BlockGrid, theta: torch.Tensor, group_size: int) -> BlockGrid:
        """``grid`` (fields ``(B, R, .)``) with ``d`` (and ``dmin``) set to ``theta`` (``(B, R, T, n_spans)``, as
        :meth:`store` gives them), each repeated over the blocks of its span; sub-scales unchanged."""
        fmt = self.fmt
        B, R = theta.shape[:2]
        per = grid.stored.d.shape[-1] // theta.shape[-1]
        d = theta[:, :, 0].repeat_interleave(per, -1)
        dmin = None if grid.stored.dmin is None else theta[:, :, 1].repeat_interleave(per, -1)
        stored = GgmlGrid(d=d, dmin=dmin, sc=grid.stored.sc, m=grid.stored.m)
        s, o = fmt.group_scale_offset(reshape_grid(stored, B * R))
        return BlockGrid(s.reshape(B, R, -1), o.reshape(B, R, -1), stored)

    def decode(self, codes: torch.Tensor, grid: BlockGrid, group_size: int) -> torch.Tensor:
        """``W_hat`` of ``codes`` (``(B, R, C)``) on ``grid``: the format's exact dequantizer (float32)."""
        B, R, C = codes.shape
        return self.fmt.dequantize(codes.reshape(B * R, C), reshape_grid(grid.stored, B * R)).reshape(B, R, C)

    def linear_fields(self, grid: BlockGrid, d_out: int, group_size: int) -> dict[str, Any]:
        """The fields of a ``QuantizedLinear`` (besides its codes) for ``grid``: the stored fields (``(d_out,
        .)``), the exact per-group scale and offset they imply, the format's name, bits and group size."""
        fmt = self.fmt
        stored = map_grid(grid.stored, lambda t: t.reshape(d_out, -1).cpu().contiguous())
        scale, offset = fmt.group_scale_offset(stored)
        return {"scale": scale, "zero": offset, "bits": fmt.bits, "group_size": fmt.group_size,
                "sym": not fmt.asymmetric, "fmt": self.fmt_name, "grid": stored}


def format_spec(name: str, search: bool = True) -> FormatSpec:
    """The solver grid of the storage format ``name``: :class:`FormatSpec`, or the spec class the format
    names (``spec_class``, e.g. LPBQ's, which fixes a per-row scale before its blocks)."""
    cls = getattr(get_format(name), "spec_class", None) or FormatSpec
    return cls(name, search=search)
