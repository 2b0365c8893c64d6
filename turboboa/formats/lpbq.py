"""Qualcomm's low-power block quantization (LPBQ) as a storage format: ``--format lpbq4``.

Every block scale is a per-channel float scale times a small integer (reference ``onnx-qdq.md`` §3):

    W_hat[r, c] = fp32( fp32(s_r * k[r, b]) * q[r, c] ),   b = c // B,

* ``q = code - 8`` in ``[-8, 7]``: symmetric int4, zero point 0, blocks of ``B`` input columns (one output
  channel per block: blocks run along the input channel only);
* ``k[r, b]`` an integer in ``[1, 2^m]`` with ``m = 4``, so ``1..16``: 4-bit block scales on an 8-bit
  per-channel grid (AIMET's ``decompressed_bw = 8`` for 4-bit weights). ``k = 0`` is left out: a zero block
  scale adds nothing that the codes of an all-zero block do not already give, and 1..16 keeps sixteen
  distinct block scales in the uint8 tensor of ORT's LPBQ pattern;
* ``s_r > 0`` float32 per output channel.

The order of the two products is the ONNX graph's (uint8 ``k`` -> DequantizeLinear with scale ``s`` -> block
scales -> blocked DequantizeLinear of the int4 weight), so torch and onnxruntime agree bit for bit.

The stored grid reuses :class:`~turboboa.formats.base.GgmlGrid`: ``d`` holds ``s_r`` repeated in every block
of its row (float32, not fp16), ``sc`` holds ``k``. Structurally this is a GGUF k-quant with a float32
per-channel scale instead of the fp16 ``d`` and the whole row as its super-block; it has no GGUF type.

How the solvers land on this grid (:class:`LpbqSpec`):

* ``s_r`` is fixed when a solver reaches the row's first column (:meth:`LpbqSpec.for_rows`), from the whole
  row as it is then (GPTQ: the original row; BoA/TurboBoA: the row after the compensation of earlier row
  blocks): each block's best continuous positive scale ``s_b`` is searched (the Hessian-diagonal-weighted
  shrink search of the ggml types) and ``s_r = max_b s_b / 16``, so the widest block sits at ``k = 16``. Every
  ``k`` is a multiple of ``s_r``, so it must exist before any block is chosen, and the widest block bounds
  it: the same reason a k-quant's fp16 super-scale is fixed at its super-block's first column.
* each block's ``k`` is chosen at that block's first column (:meth:`LpbqSpec.fit`), from the weights as they
  are then (under GPTQ already compensated for every earlier column) with ``s_r`` fixed: all sixteen values
  are tried and the one of smallest Hessian-diagonal-weighted rounding error of the block kept. Choosing it
  late lets the block scale follow what the compensation pushed into the block (GPTQ's reason for fitting a
  group's grid at its first column), and the exhaustive search is exact and cheap.
* TurboBoA's refinement: with codes and ``k`` fixed, ``W_hat`` is linear in ``s_r``, refined in closed form
  under the row Hessian (:func:`turboboa.solvers.refine.refine_params`), kept where the objective
  falls and ``s_r`` stays positive.

An all-zero row gets ``s_r = 1`` and an all-zero block ``k = 1``, both with codes 8 (``q = 0``): exactly 0.
The block size is 32 (``lpbq4``) or 16, 64, 128 (``lpbq4_g16`` ..., or ``--format lpbq4 --group-size 64``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from turboboa.formats.base import BlockFormat, GgmlGrid
from turboboa.formats.spec import FormatSpec, grouped
from turboboa.grids import BlockGrid

K_BITS = 4
K_MAX = 2**K_BITS  # block multipliers k in 1..16
DEFAULT_BLOCK = 32
FAMILY = "lpbq4"
LPBQ_BLOCKS = {16: "lpbq4_g16", 32: "lpbq4", 64: "lpbq4_g64", 128: "lpbq4_g128"}


def lpbq_name(block: int) -> str:
    """The registered LPBQ format with blocks of ``block`` columns."""
    return LPBQ_BLOCKS[block]


def is_lpbq(name: str) -> bool:
    """True for the LPBQ formats (every block size)."""
    return name.lower() in LPBQ_BLOCKS.values()


def _positive_rows(s: torch.Tensor) -> torch.Tensor:
    """``s`` where it is positive and finite, else 1 (an all-zero row: any positive scale decodes to 0)."""
    return torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))


@dataclass(frozen=True, eq=False)
class LpbqSpec(FormatSpec):
    """LPBQ as a solver's grid: :meth:`for_rows` fixes ``s_r``, :meth:`fit` chooses each block's ``k``.

    ``row_scale``: ``(B|1, R)`` float32 ``s_r`` of the rows being solved, set by :meth:`for_rows`.
    """

    row_scale: torch.Tensor | None = None

    def candidates(self, w: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive block scales covering ``[p min, p max]`` of a block: ``p max(max_w / 7, -min_w / 8)``."""
        lv = self.fmt.levels
        top = w.amax(-1).clamp(min=0) / float(lv[-1])
        bottom = (-w.amin(-1)).clamp(min=0) / float(-lv[0])
        scale = p * torch.maximum(top, bottom)
        return scale, torch.zeros_like(scale)

    def for_rows(self, W: torch.Tensor, H: torch.Tensor | None = None) -> LpbqSpec:
        """``s_r = max_b s_b / 16`` from whole rows ``W`` (``(B, R, C)``), ``s_b`` each block's best
        continuous scale (range search weighted by ``diag(H)``, ``H``: ``(B|1, C, C)``)."""
        G = self.fmt.block_size
        B, R, C = W.shape
        wg = W.to(torch.float32).reshape(B, R, C // G, G)
        if H is None:
            h = torch.ones(1, 1, 1, G, dtype=wg.dtype, device=W.device)
        else:
            h = torch.diagonal(H, dim1=-2, dim2=-1).to(wg.dtype).reshape(-1, 1, C // G, G)
        block, _ = self.continuous(wg, h)
        return replace(self, row_scale=_positive_rows(block.amax(-1) / K_MAX))

    def fit(self, w: torch.Tensor, H_block: torch.Tensor | None = None) -> BlockGrid:
        """Each block's ``k`` in 1..16 for the fixed ``s_r``: the smallest ``sum_c h_c (q_c - w_c)^2`` (ties
        to the smaller ``k``); ``w``: ``(B, R, W)``, whole blocks. Without :meth:`for_rows`, ``s_r`` comes
        from ``w``."""
        spec = self if self.row_scale is not None else self.for_rows(w, H_block)
        G = self.fmt.block_size
        B, R, W = w.shape
        nb = W // G
        wg, h = grouped(w, H_block, G)
        s = spec.row_scale.to(torch.float32).reshape(-1, R, 1).expand(B, R, nb)
        k = torch.arange(1, K_MAX + 1, dtype=torch.float32, device=w.device).reshape(-1, 1, 1, 1)
        scale = s.unsqueeze(0) * k  # (K, B, R, nb): fp32(s_r * k)
        err = self._group_error(wg, h, scale, torch.zeros_like(scale))
        kb = err.argmin(0).to(torch.int32) + 1
        block_scale = s * kb.to(torch.float32)
        return BlockGrid(block_scale, torch.zeros_like(block_scale), GgmlGrid(d=s.contiguous(), sc=kb))


class _Lpbq4(BlockFormat):
    """4-bit LPBQ: ``w = fp32(s_r * k_b) * (q - 8)``, ``q`` in 0..15, ``k_b`` in 1..16, ``s_r > 0`` (fp32)."""

    bits = 4
    levels = torch.arange(16, dtype=torch.float32) - 8
    asymmetric = False
    row_scale = True
    sc_range = (1, K_MAX)
    spec_class = LpbqSpec
    onnx_encoding = "lpbq"

    @classmethod
    def gguf_refusal(cls, source: str, layer: str) -> str:
        """No ggml type stores LPBQ: export ONNX, or quantize onto a ggml type."""
        return (f"{source} holds {cls.name} layers (e.g. {layer}), Qualcomm's LPBQ grid, which no ggml type "
                f"stores; export it with --to onnx (--profile npu), or quantize with a ggml --format")

    @classmethod
    def group_scale_offset(cls, grid: GgmlGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale_b = fp32(d * k_b)`` (``d = s_r``; one rounding, as DequantizeLinear of ``k``), offset 0."""
        assert grid.sc is not None
        scale = grid.d.to(torch.float32) * grid.sc.to(torch.float32)
        return scale, torch.zeros_like(scale)

    @classmethod
    def snap(cls, scale: torch.Tensor, offset: torch.Tensor | None = None) -> GgmlGrid:
        """Per row: ``s_r = max_b scale_b / 16`` (1 for an all-zero row), ``k_b = clamp(round(scale_b / s_r),
        1, 16)``; scales are clamped at 0 and ``offset`` must be None or 0."""
        if offset is not None and bool((offset != 0).any()):
            raise ValueError(f"{cls.name} is symmetric (w = scale * level): offsets must be 0 or None")
        x = scale.to(torch.float32).clamp_min(0)
        s = _positive_rows(x.amax(-1, keepdim=True) / K_MAX)
        k = torch.clamp(torch.round(x / s), 1, K_MAX).to(torch.int32)
        return GgmlGrid(d=s.expand_as(x).contiguous(), sc=k)

    @classmethod
    def store_scale(cls, x: torch.Tensor) -> torch.Tensor:
        """``s_r`` is stored as float32: no rounding."""
        return x.to(torch.float32)

    @classmethod
    def valid_scale(cls, x: torch.Tensor) -> torch.Tensor:
        """``s_r`` must be positive and finite."""
        return torch.isfinite(x) & (x > 0)

    @classmethod
    def check_grid(cls, codes: torch.Tensor, grid: GgmlGrid) -> None:
        """Raise ``ValueError`` unless codes are 0..15 and the grid is one positive finite ``s_r`` per row
        (repeated per block) with integer ``k`` in 1..16 per block."""
        rows, cols = codes.shape
        shape = (rows, cols // cls.block_size)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > cls.code_max()):
            raise ValueError(f"{cls.name}: codes must lie in 0..{cls.code_max()}")
        if grid.dmin is not None or grid.m is not None:
            raise ValueError(f"{cls.name}: dmin and m must be None")
        d, k = grid.d, grid.sc
        if tuple(d.shape) != shape or not bool(cls.valid_scale(d.float()).all()):
            raise ValueError(f"{cls.name}: d must be {shape} positive finite per-channel scales")
        if d.numel() and not torch.equal(d, d[:, :1].expand_as(d)):
            raise ValueError(f"{cls.name}: d must hold one per-channel scale per row")
        if k is None or tuple(k.shape) != shape or (k.numel() and (int(k.min()) < 1 or int(k.max()) > K_MAX)):
            raise ValueError(f"{cls.name}: sc must be {shape} integers in 1..{K_MAX}")


class LPBQ4(_Lpbq4, name="lpbq4", family=FAMILY):
    """LPBQ, blocks of 32 (the default)."""

    block_size = group_size = 32


class LPBQ4_G16(_Lpbq4, name="lpbq4_g16", family=FAMILY):
    """LPBQ, blocks of 16."""

    block_size = group_size = 16


class LPBQ4_G64(_Lpbq4, name="lpbq4_g64", family=FAMILY):
    """LPBQ, blocks of 64."""

    block_size = group_size = 64


class LPBQ4_G128(_Lpbq4, name="lpbq4_g128", family=FAMILY):
    """LPBQ, blocks of 128."""

    block_size = group_size = 128
