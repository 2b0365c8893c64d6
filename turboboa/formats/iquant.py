"""llama.cpp's i-quants as registered :class:`~turboboa.formats.base.GgmlFormat` classes.

Layouts and decode order follow ``shared/reference/iquants.md`` §4; the codebooks (lattice grids), the sign
table and the IQ4 values are read from the gguf package, the byte packing is ours. Every i-quant decodes, per
weight, to an exact fp32 product (reference §1)

    w = S_g * level[code],      S_g = d * (2 ls_g + 1)   (IQ4_XS: S_g = d * (ls_g - 32))

with ``d`` the block's fp16 super-scale and ``ls_g`` the integer sub-block scale, so they share the scalar
formats' dequantizer (``group_scale_offset`` gives ``S_g``, the offset is 0). What makes IQ1/IQ2/IQ3
*codebook* formats is that the per-weight codes are not free: the magnitudes of each ``dim`` consecutive
weights (8, or 4 for IQ3) must be one entry of the type's grid, and the signs obey the type's rule:

==========  =====  ===  ======  ==========================  ================================================
type        group  dim  grid    level[code] (signed)        signs
==========  =====  ===  ======  ==========================  ================================================
iq2_xxs     32     8    256     +-{8, 25, 43} / 8           even number of negatives per 8 (7 stored bits)
iq2_xs      16     8    512     +-{8, 25, 43} / 8           even per 8
iq2_s       16     8    1024    +-{8, 25, 43} / 8           free (8 stored bits)
iq3_xxs     32     4    256     +-{4, 12, ..., 52, 62} / 4  even per 8 (two codewords share 7 bits)
iq3_s       32     4    512     +-{1, 3, ..., 15}           free
iq1_s       32     8    2048    g + delta, g in {-1, 0, 1}  none (signed grid); one delta = +-1/8 per 32
iq1_m       16     8    2048    g + delta                   none; one delta per 8
iq4_xs      32     1    --      K[q] (16 values)            none (scalar, like IQ4_NL)
==========  =====  ===  ======  ==========================  ================================================

A code ``c`` of the sign-magnitude tables (IQ2, IQ3) is ``n + m`` for ``+mag[m]`` and ``n - 1 - m`` for
``-mag[m]`` (``n`` magnitudes), so the level table increases with the code. IQ1's six levels are
``g + delta`` for ``code = 2 (g + 1) + (delta > 0)``. :meth:`CodebookFormat.pack` checks every constraint
and raises ``ValueError`` on a code vector the type cannot store.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from turboboa.formats.base import BlockFields, GgmlFormat, GgmlGrid, round_fp16
from turboboa.formats.codebook import CodebookSpec
from turboboa.formats.ggml import (
    _check_snap_input,
    _f16_bytes,
    _f16_values,
    _interleave,
    _require_zero_offset,
    _snap_superblock,
    _split,
    _SymmetricKQuant,
)

T = GGMLQuantizationType
_KSIGNS = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)


def _gguf_grid(cls: type) -> np.ndarray:
    """The ``(entries, dim)`` grid of a gguf-py i-quant class, as the index of each coordinate's value in
    ``grid_map`` (IQ2/IQ3 magnitude levels) or the signed value itself (IQ1's {-1, 0, 1})."""
    cls.init_grid()
    grid = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    values = np.asarray(cls.grid_map, dtype=np.float32)
    if values[0] < 0:  # IQ1: the grid holds signed values
        return grid.astype(np.int64)
    return np.searchsorted(values, grid).astype(np.int64)


def _u16(b: np.ndarray) -> np.ndarray:
    """(..., 2k) uint8 little-endian -> (..., k) uint16."""
    return np.ascontiguousarray(b).view("<u2")


def _u32(b: np.ndarray) -> np.ndarray:
    """(..., 4k) uint8 little-endian -> (..., k) uint32."""
    return np.ascontiguousarray(b).view("<u4")


def _bytes(words: np.ndarray, dtype: str) -> np.ndarray:
    """(N, k) integer words -> (N, k * size) uint8, little-endian."""
    n = words.shape[0]
    return np.ascontiguousarray(words.astype(dtype)).view(np.uint8).reshape(n, -1)


def _sign_bits(neg: np.ndarray) -> np.ndarray:
    """(..., 8) bool "negative" flags of an 8-group -> (...,) uint8 mask, bit j = weight j negative."""
    return np.bitwise_or.reduce(neg.astype(np.uint8) << np.arange(8, dtype=np.uint8), axis=-1)


def _sign_flags(mask: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_sign_bits`: (...,) uint8 -> (..., 8) bool."""
    return ((mask[..., None] >> np.arange(8, dtype=np.uint8)) & 1).astype(bool)


def _pack_sign_words(neg: np.ndarray, ls: np.ndarray) -> np.ndarray:
    """IQ2_XXS/IQ3_XXS: per 32 weights one u32, the 7 stored sign bits of 8-group g at bits ``7g`` and ``ls`` at
    bits 28-31: ``(N, 256)`` flags and ``(N, 8)`` ls -> ``(N, 8)`` uint32."""
    n = neg.shape[0]
    s7 = (_sign_bits(neg.reshape(n, 8, 4, 8)) & 127).astype(np.uint32)
    return np.bitwise_or.reduce(s7 << (7 * np.arange(4, dtype=np.uint32)), axis=-1) | (ls.astype(np.uint32) << 28)


def _unpack_sign_words(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_pack_sign_words` (the 8th sign bit from the parity table): ``(N, 8)`` uint32 ->
    (``(N, 256)`` negative flags, ``(N, 8)`` ls)."""
    s7 = (w[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127
    return _sign_flags(_KSIGNS[s7]).reshape(w.shape[0], 256), w >> 28


class CodebookFormat(GgmlFormat):
    """An i-quant whose ``dim`` consecutive weights form one grid entry (IQ1, IQ2, IQ3).

    Class constants: ``dim``, ``grid`` (``(K, dim)`` int: magnitude level indices, or IQ1's signed values),
    ``magnitudes`` (the unit magnitude of each level index), ``sign_rule`` (``"even"``: the negatives of
    every 8 consecutive weights are even; ``"free"``; ``"none"``: the grid is signed), ``ls_max`` (largest
    sub-block scale index; the multiplier is ``2 ls + 1``).
    """

    asymmetric = False
    block_size = 256
    spec_class = CodebookSpec
    onnx_encoding = None  # a codeword per ``dim`` weights: no per-weight integer for DequantizeLinear
    dim: ClassVar[int]
    grid: ClassVar[np.ndarray]
    magnitudes: ClassVar[tuple[float, ...]]
    sign_rule: ClassVar[str]
    ls_max: ClassVar[int]

    # ------------------------------------------------------------------------------------------ grid
    @classmethod
    def group_scale_offset(cls, grid: GgmlGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """``S_g = fp32(d * (2 ls_g + 1))`` (exact: an 11-bit by 5-bit product), offset 0."""
        assert grid.sc is not None
        d = grid.d.to(torch.float32).repeat_interleave(cls.groups_per_block, dim=-1)
        scale = d * (2 * grid.sc.to(torch.float32) + 1)
        return scale, torch.zeros_like(scale)

    @classmethod
    def snap(cls, scale: torch.Tensor, offset: torch.Tensor | None = None) -> GgmlGrid:
        """Per block the largest group scale ``S*`` takes the top multiplier: ``d = fp16(S* / (2 ls_max + 1))``,
        then ``ls_g = clamp(round((S_g / d - 1) / 2), 0, ls_max)`` (the odd multiplier nearest ``S_g / d``).
        Negative scales count as 0; a block of zeros gets ``d = 0``."""
        _check_snap_input(cls, scale, "scale")
        _require_zero_offset(cls, offset)
        top = 2 * cls.ls_max + 1
        scale = scale.clamp_min(0)
        d, _ = _snap_superblock(scale, cls.groups_per_block, top, 0, top)
        dd = d.repeat_interleave(cls.groups_per_block, dim=-1)
        ok = dd != 0
        ratio = scale / torch.where(ok, dd, torch.ones_like(dd))
        ls = torch.where(ok, torch.round((ratio - 1) / 2).clamp(0, cls.ls_max), torch.zeros_like(ratio))
        rows = scale.shape[0]
        return GgmlGrid(d=d, sc=ls.to(torch.int32).reshape(rows, -1))

    # ------------------------------------------------------------------------------------------ codes
    @classmethod
    def code_parts(cls, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes ``(N, 256)`` -> (grid coordinate per weight, ``negative`` flag per weight).

        The coordinate is the magnitude level index (IQ2/IQ3) or the signed value g (IQ1, whose second
        array is then ``delta < 0``)."""
        q = q.astype(np.int64)
        n = len(cls.magnitudes)
        neg = q < n
        return np.where(neg, n - 1 - q, q - n), neg

    @classmethod
    def codes_from_parts(cls, coord: np.ndarray, neg: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`code_parts`."""
        n = len(cls.magnitudes)
        return np.where(neg, n - 1 - coord, coord + n).astype(np.uint8)

    @classmethod
    @functools.cache
    def _index_table(cls) -> np.ndarray:
        """Dense lookup: the key of a coordinate vector -> its grid index, or -1 when it is off the grid."""
        base = cls._key_base()
        table = np.full(base**cls.dim, -1, dtype=np.int64)
        table[cls._keys(cls.grid)] = np.arange(cls.grid.shape[0])
        return table

    @classmethod
    def _key_base(cls) -> int:
        return 3 if cls.sign_rule == "none" else len(cls.magnitudes)

    @classmethod
    def _keys(cls, coords: np.ndarray) -> np.ndarray:
        """``(..., dim)`` coordinates -> ``(...,)`` integer keys (base ``_key_base``)."""
        shift = 1 if cls.sign_rule == "none" else 0
        powers = cls._key_base() ** np.arange(cls.dim, dtype=np.int64)
        return ((coords + shift) * powers).sum(-1)

    @classmethod
    def grid_index(cls, coords: np.ndarray) -> np.ndarray:
        """Grid index of every ``dim``-vector of coordinates ``(N, 256)`` -> ``(N, 256 / dim)``; ``ValueError``
        naming the type when one is not a grid entry."""
        n = coords.shape[0]
        idx = cls._index_table()[cls._keys(coords.reshape(n, -1, cls.dim))]
        if (idx < 0).any():
            raise ValueError(f"{cls.name}: a group of {cls.dim} weights is not an entry of the codebook")
        return idx

    @classmethod
    def grid_coords(cls, idx: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`grid_index`: ``(N, 256 / dim)`` -> ``(N, 256)`` coordinates."""
        return cls.grid[idx].reshape(idx.shape[0], -1)

    @classmethod
    def check_signs(cls, neg: np.ndarray) -> None:
        """Raise ``ValueError`` when the "even" rule is broken (an odd count of negatives in an 8-group)."""
        if cls.sign_rule == "even" and (neg.reshape(neg.shape[0], -1, 8).sum(-1) % 2).any():
            raise ValueError(f"{cls.name}: every 8 consecutive weights must hold an even number of negatives")

    @classmethod
    def _fields(cls, blocks: BlockFields) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(grid indices ``(N, 256/dim)``, negative flags ``(N, 256)``, ``ls`` ``(N, groups)`` uint)."""
        assert blocks.sc is not None
        coord, neg = cls.code_parts(blocks.q)
        idx = cls.grid_index(coord)
        cls.check_signs(neg)
        return idx, neg, blocks.sc.astype(np.int64)

    @classmethod
    def _blocks(cls, idx: np.ndarray, neg: np.ndarray, ls: np.ndarray, d: np.ndarray) -> BlockFields:
        """BlockFields from the unpacked fields."""
        q = cls.codes_from_parts(cls.grid_coords(idx), neg)
        return BlockFields(q=q, d=d, sc=ls.astype(np.int32))


def _sign_level_table(magnitudes: tuple[float, ...]) -> torch.Tensor:
    """``[-m_{n-1}, ..., -m_0, m_0, ..., m_{n-1}]``: code ``n + i`` is ``+m_i``, code ``n - 1 - i`` is ``-m_i``."""
    m = torch.tensor(magnitudes, dtype=torch.float32)
    return torch.cat([-m.flip(0), m])


_IQ2_MAG = tuple(v / 8 for v in gq.IQ2_XXS.grid_map)
_IQ3XXS_MAG = tuple(v / 4 for v in gq.IQ3_XXS.grid_map)
_IQ3S_MAG = tuple(float(v) for v in gq.IQ3_S.grid_map)


class _IQ2(CodebookFormat):
    """IQ2_*: 8-weight codewords over the magnitudes {8, 25, 43} / 8, ``S_g = d (2 ls_g + 1)``, ls 0..15."""

    bits = 3
    dim = 8
    magnitudes = _IQ2_MAG
    levels = _sign_level_table(_IQ2_MAG)
    ls_max = 15
    sc_range = (0, 15)


class _IQ3(CodebookFormat):
    """IQ3_*: 4-weight codewords over 8 magnitudes, ``S_g = d (2 ls_g + 1)``, ls 0..15, groups of 32."""

    group_size = 32
    bits = 4
    dim = 4
    ls_max = 15
    sc_range = (0, 15)


class IQ2_XXS(_IQ2, name="iq2_xxs", ggml_type=T.IQ2_XXS):
    """``d | 8 x (4 grid bytes, u32 W)`` (66 B): W holds four 7-bit sign masks (bits 7g) and ``ls`` (bits 28-31)."""

    group_size = 32
    grid = _gguf_grid(gq.IQ2_XXS)
    sign_rule = "even"

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        idx, neg, ls = cls._fields(blocks)
        n = idx.shape[0]
        w = _pack_sign_words(neg, ls)
        body = np.concatenate([idx.reshape(n, 8, 4).astype(np.uint8), _bytes(w, "<u4").reshape(n, 8, 4)], axis=2)
        return np.concatenate([_f16_bytes(blocks.d), body.reshape(n, 64)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        d, body = _split(raw, (2, 64))
        n = raw.shape[0]
        body = body.reshape(n, 8, 8)
        idx = body[:, :, :4].reshape(n, 32).astype(np.int64)
        neg, ls = _unpack_sign_words(_u32(body[:, :, 4:]).reshape(n, 8))
        return cls._blocks(idx, neg, ls, _f16_values(d))


class IQ2_XS(_IQ2, name="iq2_xs", ggml_type=T.IQ2_XS):
    """``d | 32 x u16 (9-bit index | 7-bit signs << 9) | scales[8]`` (74 B); ``ls`` per 16 weights."""

    group_size = 16
    grid = _gguf_grid(gq.IQ2_XS)
    sign_rule = "even"

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        idx, neg, ls = cls._fields(blocks)
        n = idx.shape[0]
        s7 = (_sign_bits(neg.reshape(n, 32, 8)) & 127).astype(np.uint16)
        qs = idx.astype(np.uint16) | (s7 << 9)
        scales = _interleave(ls.reshape(n, 8, 2).swapaxes(1, 2), 4)
        return np.concatenate([_f16_bytes(blocks.d), _bytes(qs, "<u2"), scales], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        d, qs, scales = _split(raw, (2, 64, 8))
        n = raw.shape[0]
        q = _u16(qs).reshape(n, 32)
        neg = _sign_flags(_KSIGNS[q >> 9]).reshape(n, 256)
        ls = np.stack([scales & 15, scales >> 4], axis=-1).reshape(n, 16)
        return cls._blocks((q & 511).astype(np.int64), neg, ls, _f16_values(d))


class IQ2_S(_IQ2, name="iq2_s", ggml_type=T.IQ2_S):
    """``d | idx low[32] | signs[32] | idx high 2-bit[8] | scales[8]`` (82 B); 8 free sign bits per 8."""

    group_size = 16
    grid = _gguf_grid(gq.IQ2_S)
    sign_rule = "free"

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        idx, neg, ls = cls._fields(blocks)
        n = idx.shape[0]
        signs = _sign_bits(neg.reshape(n, 32, 8))
        qh = _interleave((idx >> 8).reshape(n, 8, 4).swapaxes(1, 2), 2)
        scales = _interleave(ls.reshape(n, 8, 2).swapaxes(1, 2), 4)
        return np.concatenate([_f16_bytes(blocks.d), (idx & 255).astype(np.uint8), signs, qh, scales], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        d, lo, signs, qh, scales = _split(raw, (2, 32, 32, 8, 8))
        n = raw.shape[0]
        hi = (qh[:, :, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3
        idx = lo.astype(np.int64) | (hi.reshape(n, 32).astype(np.int64) << 8)
        ls = np.stack([scales & 15, scales >> 4], axis=-1).reshape(n, 16)
        return cls._blocks(idx, _sign_flags(signs).reshape(n, 256), ls, _f16_values(d))


class IQ3_XXS(_IQ3, name="iq3_xxs", ggml_type=T.IQ3_XXS):
    """``d | idx[64] | 8 x u32 W`` (98 B): W holds four 7-bit sign masks of 8 weights and ``ls`` (bits 28-31)."""

    grid = _gguf_grid(gq.IQ3_XXS)
    magnitudes = _IQ3XXS_MAG
    levels = _sign_level_table(_IQ3XXS_MAG)
    sign_rule = "even"

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        idx, neg, ls = cls._fields(blocks)
        w = _pack_sign_words(neg, ls)
        return np.concatenate([_f16_bytes(blocks.d), idx.astype(np.uint8), _bytes(w, "<u4")], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        d, idx, words = _split(raw, (2, 64, 32))
        neg, ls = _unpack_sign_words(_u32(words).reshape(raw.shape[0], 8))
        return cls._blocks(idx.astype(np.int64), neg, ls, _f16_values(d))


class IQ3_S(_IQ3, name="iq3_s", ggml_type=T.IQ3_S):
    """``d | idx low[64] | idx bit 8 [8] | signs[32] | scales[4]`` (110 B); ``S_g = d (1 + 2 ls_g)``."""

    grid = _gguf_grid(gq.IQ3_S)
    magnitudes = _IQ3S_MAG
    levels = _sign_level_table(_IQ3S_MAG)
    sign_rule = "free"

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        idx, neg, ls = cls._fields(blocks)
        n = idx.shape[0]
        qh = _interleave(((idx >> 8) & 1).reshape(n, 8, 8).swapaxes(1, 2), 1)
        signs = _sign_bits(neg.reshape(n, 32, 8))
        scales = _interleave(ls.reshape(n, 4, 2).swapaxes(1, 2), 4)
        return np.concatenate([_f16_bytes(blocks.d), (idx & 255).astype(np.uint8), qh, signs, scales], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        d, lo, qh, signs, scales = _split(raw, (2, 64, 8, 32, 4))
        n = raw.shape[0]
        hi = (qh[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1
        idx = lo.astype(np.int64) | (hi.reshape(n, 64).astype(np.int64) << 8)
        ls = np.stack([scales & 15, scales >> 4], axis=-1).reshape(n, 8)
        return cls._blocks(idx, _sign_flags(signs).reshape(n, 256), ls, _f16_values(d))


_IQ1_DELTA = float(gq.IQ1_S.delta)


class _IQ1(CodebookFormat):
    """IQ1_S/IQ1_M: a signed ternary grid shifted by ``delta = +-1/8``; ``S_g = d (2 ls_g + 1)``, ls 0..7.

    Codes: ``2 (g + 1) + (delta > 0)`` over the levels ``g + delta``; the weights sharing one stored delta
    (``delta_span``) must agree on its sign."""

    bits = 3
    dim = 8
    grid = _gguf_grid(gq.IQ1_S)
    magnitudes = (1.0,)
    levels = torch.tensor([g + s * _IQ1_DELTA for g in (-1, 0, 1) for s in (-1, 1)], dtype=torch.float32)
    sign_rule = "none"
    ls_max = 7
    sc_range = (0, 7)
    delta_span: ClassVar[int]

    @classmethod
    def code_parts(cls, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes -> (g in {-1, 0, 1}, ``delta < 0``)."""
        q = q.astype(np.int64)
        return q // 2 - 1, (q % 2) == 0

    @classmethod
    def codes_from_parts(cls, coord: np.ndarray, neg: np.ndarray) -> np.ndarray:
        return (2 * (coord + 1) + (~neg.astype(bool))).astype(np.uint8)

    @classmethod
    def check_signs(cls, neg: np.ndarray) -> None:
        """Raise ``ValueError`` unless every ``delta_span`` weights share one delta."""
        spans = neg.reshape(neg.shape[0], -1, cls.delta_span)
        if (spans != spans[..., :1]).any():
            raise ValueError(f"{cls.name}: every {cls.delta_span} consecutive weights share one delta sign")

    @classmethod
    def deltas(cls, neg: np.ndarray) -> np.ndarray:
        """``(N, 256)`` negative-delta flags -> one flag per ``delta_span`` (``(N, 256 / delta_span)``)."""
        return neg.reshape(neg.shape[0], -1, cls.delta_span)[..., 0]


class IQ1_S(_IQ1, name="iq1_s", ggml_type=T.IQ1_S):
    """``d | idx low[32] | 8 x u16 h`` (50 B): h = index bits 8-10 (3 per group) | ls << 12 | delta < 0 << 15."""

    group_size = 32
    delta_span = 32

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        idx, neg, ls = cls._fields(blocks)
        n = idx.shape[0]
        hi = (idx >> 8).reshape(n, 8, 4).astype(np.uint16)
        h = np.bitwise_or.reduce(hi << (3 * np.arange(4, dtype=np.uint16)), axis=-1)
        h = h | (ls.astype(np.uint16) << 12) | (cls.deltas(neg).astype(np.uint16) << 15)
        return np.concatenate([_f16_bytes(blocks.d), (idx & 255).astype(np.uint8), _bytes(h, "<u2")], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        d, lo, hb = _split(raw, (2, 32, 16))
        n = raw.shape[0]
        h = _u16(hb).reshape(n, 8)
        hi = (h[:, :, None] >> (3 * np.arange(4, dtype=np.uint16))) & 7
        idx = lo.astype(np.int64) | (hi.reshape(n, 32).astype(np.int64) << 8)
        neg = np.repeat(((h >> 15) & 1).astype(bool), 32, axis=1)
        return cls._blocks(idx, neg, (h >> 12) & 7, _f16_values(d))


class IQ1_M(_IQ1, name="iq1_m", ggml_type=T.IQ1_M):
    """``idx low[32] | qh[16] | 4 x u16 sc`` (56 B): qh byte m = index bits 8-10 and delta sign of groups 2m
    (bits 0-3) and 2m+1 (bits 4-7); sc word t = ls of 4 sub-blocks of 16 (3 bits each) | nibble t of d << 12."""

    group_size = 16
    delta_span = 8

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        idx, neg, ls = cls._fields(blocks)
        n = idx.shape[0]
        nib = ((idx >> 8) & 7) | (cls.deltas(neg).astype(np.int64) << 3)
        qh = _interleave(nib.reshape(n, 16, 2).swapaxes(1, 2), 4)
        dbits = np.ascontiguousarray(blocks.d.astype("<f2")).view("<u2").astype(np.uint16).reshape(n, 1)
        sc = np.bitwise_or.reduce(ls.reshape(n, 4, 4).astype(np.uint16) << (3 * np.arange(4, dtype=np.uint16)),
                                  axis=-1)
        sc = sc | (((dbits >> (4 * np.arange(4, dtype=np.uint16))) & 15) << 12)
        return np.concatenate([(idx & 255).astype(np.uint8), qh, _bytes(sc, "<u2")], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        lo, qh, scb = _split(raw, (32, 16, 8))
        n = raw.shape[0]
        nib = np.stack([qh & 15, qh >> 4], axis=-1).reshape(n, 32)
        idx = lo.astype(np.int64) | ((nib & 7).astype(np.int64) << 8)
        neg = np.repeat((nib >> 3).astype(bool), 8, axis=1)
        sc = _u16(scb).reshape(n, 4)
        ls = ((sc[:, :, None] >> (3 * np.arange(4, dtype=np.uint16))) & 7).reshape(n, 16)
        dbits = np.bitwise_or.reduce((sc >> 12) << (4 * np.arange(4, dtype=np.uint16)), axis=-1).astype("<u2")
        d = np.ascontiguousarray(dbits).view("<f2").astype(np.float32)
        return cls._blocks(idx, neg, ls, d)


class IQ4_XS(_SymmetricKQuant, name="iq4_xs", ggml_type=T.IQ4_XS):
    """``d | scales_h u16 | scales_l[4] | qs[128]`` (136 B): ``w = d * (ls - 32) * K[q]``, ls 6-bit per 32.

    A scalar type: IQ4_NL's 16 values under Q3_K-like signed sub-scales (``sc`` holds ``ls - 32``; the group
    scale of largest magnitude maps to ``sc = -32``, as llama.cpp does)."""

    group_size = 32
    bits = 4
    levels = torch.tensor(gq.IQ4_NL.kvalues, dtype=torch.float32)
    sc_range = (-32, 31)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        assert blocks.sc is not None
        n = blocks.q.shape[0]
        ls = (blocks.sc + 32).astype(np.uint16)
        sh = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=-1).reshape(n, 1)
        sl = _interleave((ls & 15).astype(np.uint8).reshape(n, 4, 2).swapaxes(1, 2), 4)
        qs = _interleave(blocks.q.reshape(n, 8, 2, 16), 4).reshape(n, 128)
        return np.concatenate([_f16_bytes(blocks.d), _bytes(sh, "<u2"), sl, qs], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        d, sh, sl, qs = _split(raw, (2, 2, 4, 128))
        n = raw.shape[0]
        hi = (_u16(sh).reshape(n, 1) >> (2 * np.arange(8, dtype=np.uint16))) & 3
        lo = np.stack([sl & 15, sl >> 4], axis=-1).reshape(n, 8)
        ls = lo.astype(np.int32) | (hi.astype(np.int32) << 4)
        q = np.stack([qs.reshape(n, 8, 16) & 15, qs.reshape(n, 8, 16) >> 4], axis=2).reshape(n, 256)
        return BlockFields(q=q, d=_f16_values(d), sc=ls - 32)


CODEBOOK_FORMATS = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m")
I_QUANTS = (*CODEBOOK_FORMATS, "iq4_xs")
__all__ = ["CODEBOOK_FORMATS", "I_QUANTS", "CodebookFormat", "round_fp16"]
