"""The ggml quantization types as registered :class:`~turboboa.formats.base.GgmlFormat` classes.

Layouts, formulas and names follow ``shared/reference/gguf-format.md`` §1-3 (written from that
description, checked against ``gguf.quants.dequantize``). ``i`` is the index of a weight inside its block, in
natural column order; groups are contiguous ranges ``g = i // group_size``. Codes are always the unsigned
stored integers ``0..2^bits-1`` and ``levels[code]`` is the integer the dequantizer multiplies by:

============  =====  =====  ==========================  ====================================================
type          block  group  level of code q             w (fp32; exact products, one rounding at the "-")
============  =====  =====  ==========================  ====================================================
q4_0          32     32     q - 8                       d*(q-8)
q4_1          32     32     q                           d*q + m            (m stored in ``grid.dmin``)
q5_0          32     32     q - 16                      d*(q-16)
q5_1          32     32     q                           d*q + m            (m stored in ``grid.dmin``)
q8_0          32     32     q - 128 (byte = q ^ 0x80)   d*(q-128)          (the stored int8 is q - 128)
iq4_nl        32     32     K[q], K the 16-entry table  d*K[q]
q2_k          256    16     q                           d*sc_g*q - dmin*m_g
q3_k          256    16     q - 4                       d*sc_g*(q-4),      sc_g = stored 6-bit S_g - 32
q4_k          256    32     q                           d*sc_g*q - dmin*m_g
q5_k          256    32     q                           d*sc_g*q - dmin*m_g
q6_k          256    16     q - 32                      d*sc_g*(q-32),     sc_g the stored int8
============  =====  =====  ==========================  ====================================================

Byte packing is vectorised numpy over all N blocks at once; bit fields are packed by :func:`_interleave`,
which puts K small fields of ``width`` bits side by side in one byte (field k at bit ``k*width``).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import IQ4_NL as _GgufIQ4NL

from turboboa.formats.base import BlockFields, GgmlFormat, GgmlGrid, round_fp16

T = GGMLQuantizationType


# ------------------------------------------------------------------------------------------ byte helpers
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(N,) fp16-representable float32 -> (N, 2) uint8, little-endian IEEE half."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _f16_values(b: np.ndarray) -> np.ndarray:
    """(N, 2) uint8 little-endian IEEE half -> (N,) float32."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(np.float32)


def _interleave(v: np.ndarray, width: int) -> np.ndarray:
    """``out[..., l] = OR_k v[..., k, l] << (k*width)``: K fields of ``width`` bits per byte.

    (..., K, L) -> (..., L) uint8; requires ``K * width <= 8``.
    """
    k = v.shape[-2]
    assert k * width <= 8
    shifts = (np.arange(k, dtype=np.uint8) * np.uint8(width)).reshape(k, 1)
    mask = np.uint8((1 << width) - 1)
    return np.bitwise_or.reduce((v.astype(np.uint8) & mask) << shifts, axis=-2)


def _deinterleave(b: np.ndarray, k: int, width: int) -> np.ndarray:
    """Inverse of :func:`_interleave`: ``v[..., k, l] = (b[..., l] >> (k*width)) & (2^width - 1)``."""
    shifts = (np.arange(k, dtype=np.uint8) * np.uint8(width)).reshape(k, 1)
    return (b[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _split(raw: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Cut ``(N, type_size)`` block bytes into consecutive fields of ``sizes`` bytes."""
    assert sum(sizes) == raw.shape[1]
    return np.split(raw, np.cumsum(sizes)[:-1], axis=1)


def _pack_2bit_halves(q: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low 2 bits: weight i at byte ``32*(i div 128) + i mod 32``, shift ``2*((i mod 128) div 32)``.

    (N, 256) -> (N, 64): each 128-weight half is (4 planes, 32 bytes), plane s at bits 2s..2s+1.
    """
    n = q.shape[0]
    return _interleave(q.reshape(n, 2, 4, 32), 2).reshape(n, 64)


def _unpack_2bit_halves(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_2bit_halves`: (N, 64) -> (N, 256) values 0..3."""
    n = b.shape[0]
    return _deinterleave(b.reshape(n, 2, 32), 4, 2).reshape(n, 256)


def _pack_bit_planes(bit: np.ndarray) -> np.ndarray:
    """Q3_K hmask / Q5_K qh: bit ``i div 32`` of byte ``i mod 32`` holds ``bit[i]``: (N, 256) -> (N, 32)."""
    n = bit.shape[0]
    return _interleave(bit.reshape(n, 8, 32), 1)


def _unpack_bit_planes(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_bit_planes`: (N, 32) -> (N, 256) values 0..1."""
    return _deinterleave(b, 8, 1).reshape(b.shape[0], 256)


def _pack_k_nibbles(q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low 4 bits, (N, 256) -> (N, 128): weight i at byte ``32*(i div 64) + i mod 32``.

    It is the low nibble when ``i mod 64 < 32``, the high nibble otherwise.
    """
    n = q.shape[0]
    return _interleave(q.reshape(n, 4, 2, 32), 4).reshape(n, 128)


def _unpack_k_nibbles(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_k_nibbles`: (N, 128) -> (N, 256) values 0..15."""
    n = b.shape[0]
    return _deinterleave(b.reshape(n, 4, 32), 2, 4).reshape(n, 256)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12 scale bytes from 6-bit ``sc_j``, ``m_j`` (N, 8).

    ``b[j] = sc_j | (sc_{j+4} >> 4) << 6``, ``b[j+4] = m_j | (m_{j+4} >> 4) << 6``,
    ``b[8+j] = (sc_{j+4} & 15) | (m_{j+4} & 15) << 4`` for j < 4.
    """
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo_sc = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    lo_m = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    nib = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo_sc, lo_m, nib], axis=1)


def _unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_pack_k4_scales`: (N, 12) -> (sc, m), each (N, 8) in 0..63."""
    lo_sc, lo_m, nib = b[:, :4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (nib & 15) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (nib >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, m


def _pack_q4_0_nibbles(q: np.ndarray) -> np.ndarray:
    """32-block nibbles, (N, 32) -> (N, 16): ``qs[j] = q[j] | q[j+16] << 4`` for j < 16."""
    return _interleave(q.reshape(q.shape[0], 2, 16), 4)


def _unpack_q4_0_nibbles(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_q4_0_nibbles`: (N, 16) -> (N, 32) values 0..15."""
    return _deinterleave(b, 2, 4).reshape(b.shape[0], 32)


# ------------------------------------------------------------------------------------------ grid helpers
def _check_snap_input(fmt: type[GgmlFormat], x: torch.Tensor, label: str) -> None:
    """``x`` must be finite and (rows, n_groups) with whole blocks (else :class:`UserError` for the width)."""
    if x.dim() != 2:
        raise ValueError(f"{fmt.name}: {label} must be (rows, n_groups), got shape {tuple(x.shape)}")
    fmt.check_width(x.shape[1] * fmt.group_size)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fmt.name}: {label} must be finite")


def _snap_superblock(values: torch.Tensor, groups_per_block: int, anchor_code: int, lo: int,
                     hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split group values ``v_g`` into an fp16 super-scale and integer multiples: ``v_g ~ D * k_g``.

    Per super-block, the group of largest ``|v_g|`` (the anchor ``v*``) is mapped to the integer
    ``anchor_code``: ``D = fp16(v* / anchor_code)``, then ``k_g = clamp(round(v_g / D), lo, hi)`` (dividing by
    the stored fp16 D, so ``D*k_g`` is the nearest multiple of the stored D). A super-block with ``D = 0``
    (all values 0, or too small for fp16) gets ``k_g = 0``. Returns ``(D (rows, n_blocks) float32,
    k (rows, n_groups) int32)``.
    """
    rows, n_groups = values.shape
    v = values.to(torch.float32).reshape(rows, n_groups // groups_per_block, groups_per_block)
    anchor = v.gather(-1, v.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    d = round_fp16(anchor / anchor_code)
    dk = d.unsqueeze(-1)
    ok = dk != 0
    k = torch.where(ok, torch.round(v / torch.where(ok, dk, torch.ones_like(dk))), torch.zeros_like(v))
    return d, k.clamp(lo, hi).to(torch.int32).reshape(rows, n_groups)


def _require_zero_offset(fmt: type[GgmlFormat], offset: torch.Tensor | None) -> None:
    """Symmetric types store no offset: ``offset`` must be ``None`` or all zeros."""
    if offset is not None and bool((offset != 0).any()):
        raise ValueError(f"{fmt.name} is symmetric (w = scale * level): offsets must be 0 or None")


# ------------------------------------------------------------------------------------------ families
class _SymmetricBlock32(GgmlFormat):
    """32-weight blocks with one fp16 scale and no min: ``w = d * levels[q]``."""

    group_size = 32
    asymmetric = False

    @classmethod
    def group_scale_offset(cls, grid: GgmlGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale = d``, ``offset = 0``."""
        return grid.d.to(torch.float32), torch.zeros_like(grid.d, dtype=torch.float32)

    @classmethod
    def snap(cls, scale: torch.Tensor, offset: torch.Tensor | None = None) -> GgmlGrid:
        """``d = fp16(scale)`` (sign kept); ``offset`` must be ``None`` or 0."""
        _check_snap_input(cls, scale, "scale")
        _require_zero_offset(cls, offset)
        return GgmlGrid(d=round_fp16(scale))


class _AsymmetricKQuant(GgmlFormat):
    """Super-blocks of 256: fp16 ``d``, ``dmin``, unsigned sc and m, ``w = d*sc*q - dmin*m``."""

    block_size = 256
    asymmetric = True

    @classmethod
    def group_scale_offset(cls, grid: GgmlGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale_g = fp32(d * sc_g)``, ``offset_g = fp32(dmin * m_g)`` (both products exact)."""
        assert grid.dmin is not None and grid.sc is not None and grid.m is not None
        g = cls.groups_per_block
        scale = grid.d.to(torch.float32).repeat_interleave(g, dim=-1) * grid.sc.to(torch.float32)
        offset = grid.dmin.to(torch.float32).repeat_interleave(g, dim=-1) * grid.m.to(torch.float32)
        return scale, offset

    @classmethod
    def snap(cls, scale: torch.Tensor, offset: torch.Tensor | None = None) -> GgmlGrid:
        """Per super-block: ``d = fp16(max_g s_g / S)``, ``sc_g = clamp(round(s_g / d), 0, S)``, and likewise
        ``dmin = fp16(max_g o_g / S)``, ``m_g = clamp(round(o_g / dmin), 0, S)`` with ``S = 15`` (Q2_K) or 63.

        ``s_g`` are the group scales and ``o_g`` the offsets (``w = s_g*q - o_g``, so ``o_g = -group min``).
        Negative scales and offsets are clamped to 0 first: the stored sub-scales and sub-mins are unsigned,
        and an offset of 0 means the grid starts at 0 (the group's min is >= 0, as llama.cpp does).
        Unlike llama.cpp, ``sc_g`` divides by the stored fp16 ``d`` (not the unrounded one), so ``d*sc_g`` is
        the nearest representable scale. All-zero super-blocks give ``d = 0``, ``sc = 0``.
        """
        _check_snap_input(cls, scale, "scale")
        if offset is None:
            offset = torch.zeros_like(scale)
        _check_snap_input(cls, offset, "offset")
        assert cls.sc_range is not None and cls.m_range is not None
        d, sc = _snap_superblock(scale.clamp_min(0), cls.groups_per_block, cls.sc_range[1], *cls.sc_range)
        dmin, m = _snap_superblock(offset.clamp_min(0), cls.groups_per_block, cls.m_range[1], *cls.m_range)
        return GgmlGrid(d=d, dmin=dmin, sc=sc, m=m)


class _SymmetricKQuant(GgmlFormat):
    """Super-blocks of 256 with a signed fp16 ``d`` and signed sub-scales: ``w = d*sc*level``."""

    block_size = 256
    asymmetric = False

    @classmethod
    def group_scale_offset(cls, grid: GgmlGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale_g = fp32(d * sc_g)`` (exact), ``offset_g = 0``."""
        assert grid.sc is not None
        d = grid.d.to(torch.float32).repeat_interleave(cls.groups_per_block, dim=-1)
        scale = d * grid.sc.to(torch.float32)
        return scale, torch.zeros_like(scale)

    @classmethod
    def snap(cls, scale: torch.Tensor, offset: torch.Tensor | None = None) -> GgmlGrid:
        """Per super-block, the group scale of largest magnitude ``s*`` maps to the most negative sub-scale
        ``S_min`` (-32 for Q3_K, -128 for Q6_K): ``d = fp16(s* / S_min)`` (so d's sign is opposite to s*),
        then ``sc_g = clamp(round(s_g / d), S_min, -S_min - 1)``. Scales may be signed; ``offset`` must be
        ``None`` or 0. All-zero super-blocks give ``d = 0``, ``sc = 0``.
        """
        _check_snap_input(cls, scale, "scale")
        _require_zero_offset(cls, offset)
        assert cls.sc_range is not None
        d, sc = _snap_superblock(scale, cls.groups_per_block, cls.sc_range[0], *cls.sc_range)
        return GgmlGrid(d=d, sc=sc)


# ------------------------------------------------------------------------------------------ 32-blocks
class Q4_0(_SymmetricBlock32, name="q4_0", ggml_type=T.Q4_0):
    """``d:fp16 | qs[16]`` (18 B); ``w = d*(q-8)``, q in 0..15, Q4_0 nibble order."""

    bits = 4
    levels = torch.arange(16, dtype=torch.float32) - 8

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, qs]`` with ``qs[j] = q[j] | q[j+16] << 4``."""
        return np.concatenate([_f16_bytes(blocks.d), _pack_q4_0_nibbles(blocks.q)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        d, qs = _split(raw, (2, 16))
        return BlockFields(q=_unpack_q4_0_nibbles(qs), d=_f16_values(d))


class Q4_1(GgmlFormat, name="q4_1", ggml_type=T.Q4_1):
    """``d:fp16 | m:fp16 | qs[16]`` (20 B); ``w = d*q + m``, q in 0..15. The min ``m`` is in ``grid.dmin``."""

    group_size = 32
    bits = 4
    asymmetric = True
    levels = torch.arange(16, dtype=torch.float32)

    @classmethod
    def group_scale_offset(cls, grid: GgmlGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale = d``, ``offset = -m`` (so ``scale*q - offset = d*q + m``, the same single rounding)."""
        assert grid.dmin is not None
        return grid.d.to(torch.float32), -grid.dmin.to(torch.float32)

    @classmethod
    def snap(cls, scale: torch.Tensor, offset: torch.Tensor | None = None) -> GgmlGrid:
        """``d = fp16(scale)``, ``m = fp16(-offset)`` (any sign for both; ``offset=None`` means 0)."""
        _check_snap_input(cls, scale, "scale")
        if offset is None:
            offset = torch.zeros_like(scale)
        _check_snap_input(cls, offset, "offset")
        return GgmlGrid(d=round_fp16(scale), dmin=round_fp16(-offset))

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, m, qs]``, nibbles as Q4_0."""
        assert blocks.dmin is not None
        return np.concatenate([_f16_bytes(blocks.d), _f16_bytes(blocks.dmin), _pack_q4_0_nibbles(blocks.q)],
                              axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        d, m, qs = _split(raw, (2, 2, 16))
        return BlockFields(q=_unpack_q4_0_nibbles(qs), d=_f16_values(d), dmin=_f16_values(m))


class Q5_0(_SymmetricBlock32, name="q5_0", ggml_type=T.Q5_0):
    """``d:fp16 | qh[4] | qs[16]`` (22 B); ``w = d*(q-16)``, q in 0..31; bit j of LE uint32 qh = q[j] >> 4."""

    bits = 5
    levels = torch.arange(32, dtype=torch.float32) - 16

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, qh, qs]``: ``qh`` the little-endian bit string of ``q >> 4``, ``qs`` as in Q4_0."""
        qh = np.packbits(blocks.q >> 4, axis=1, bitorder="little")
        return np.concatenate([_f16_bytes(blocks.d), qh, _pack_q4_0_nibbles(blocks.q & 15)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        d, qh, qs = _split(raw, (2, 4, 16))
        high = np.unpackbits(qh, axis=1, bitorder="little")
        return BlockFields(q=_unpack_q4_0_nibbles(qs) | (high << 4), d=_f16_values(d))


class Q5_1(Q4_1, name="q5_1", ggml_type=T.Q5_1):
    """``d:fp16 | m:fp16 | qh[4] | qs[16]`` (24 B); ``w = d*q + m``, q in 0..31 (Q4_1's grid, Q5_0's bits)."""

    bits = 5
    levels = torch.arange(32, dtype=torch.float32)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, m, qh, qs]``: ``qh`` and ``qs`` as in Q5_0."""
        assert blocks.dmin is not None
        qh = np.packbits(blocks.q >> 4, axis=1, bitorder="little")
        return np.concatenate([_f16_bytes(blocks.d), _f16_bytes(blocks.dmin), qh, _pack_q4_0_nibbles(blocks.q & 15)],
                              axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        d, m, qh, qs = _split(raw, (2, 2, 4, 16))
        high = np.unpackbits(qh, axis=1, bitorder="little")
        return BlockFields(q=_unpack_q4_0_nibbles(qs) | (high << 4), d=_f16_values(d), dmin=_f16_values(m))


class Q8_0(_SymmetricBlock32, name="q8_0", ggml_type=T.Q8_0):
    """``d:fp16 | int8 qs[32]`` (34 B); ``w = d*qs``. Our code is ``q = qs + 128`` in 0..255.

    The stored byte is the two's complement of ``q - 128``, i.e. ``q ^ 0x80``.
    """

    bits = 8
    levels = torch.arange(256, dtype=torch.float32) - 128

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, qs]`` with the two's complement byte of ``q - 128``, i.e. ``q ^ 0x80``."""
        return np.concatenate([_f16_bytes(blocks.d), blocks.q ^ np.uint8(0x80)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        d, qs = _split(raw, (2, 32))
        return BlockFields(q=qs ^ np.uint8(0x80), d=_f16_values(d))


class IQ4_NL(_SymmetricBlock32, name="iq4_nl", ggml_type=T.IQ4_NL):
    """Q4_0's bytes (18 B) with a non-uniform table: ``w = d*K[q]``, K from ``gguf.quants.IQ4_NL.kvalues``."""

    bits = 4
    levels = torch.tensor(_GgufIQ4NL.kvalues, dtype=torch.float32)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, qs]`` as Q4_0."""
        return Q4_0._pack_blocks(blocks)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        return Q4_0._unpack_blocks(raw)


# ------------------------------------------------------------------------------------------ k-quants
class Q2_K(_AsymmetricKQuant, name="q2_k", ggml_type=T.Q2_K):
    """``scales[16] | qs[64] | d | dmin`` (84 B); groups of 16, ``w = d*sc*q - dmin*m``, q in 0..3.

    ``scales[g] = sc_g | m_g << 4`` (4 bits each); codes in the 2-bit layout of :func:`_pack_2bit_halves`.
    """

    group_size = 16
    bits = 2
    levels = torch.arange(4, dtype=torch.float32)
    sc_range = (0, 15)
    m_range = (0, 15)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[scales, qs, d, dmin]``."""
        assert blocks.sc is not None and blocks.m is not None and blocks.dmin is not None
        scales = blocks.sc.astype(np.uint8) | (blocks.m.astype(np.uint8) << 4)
        return np.concatenate([scales, _pack_2bit_halves(blocks.q), _f16_bytes(blocks.d),
                               _f16_bytes(blocks.dmin)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        scales, qs, d, dmin = _split(raw, (16, 64, 2, 2))
        return BlockFields(q=_unpack_2bit_halves(qs), d=_f16_values(d), dmin=_f16_values(dmin),
                           sc=scales & 15, m=scales >> 4)


class Q3_K(_SymmetricKQuant, name="q3_k", ggml_type=T.Q3_K):
    """``hmask[32] | qs[64] | scales[12] | d`` (110 B); groups of 16, ``w = d*sc*(q-4)``, q in 0..7.

    q's low 2 bits sit in ``qs`` (Q2_K positions), its bit 2 is the hmask bit (set = "do not subtract 4").
    ``sc_g = S_g - 32`` with the 6-bit ``S_g``: low 4 bits in ``scales[g mod 8]`` (high nibble when g >= 8),
    high 2 bits in ``scales[8 + g mod 4]`` at bit ``2*(g div 4)``.
    """

    group_size = 16
    bits = 3
    levels = torch.arange(8, dtype=torch.float32) - 4
    sc_range = (-32, 31)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[hmask, qs, scales, d]``."""
        assert blocks.sc is not None
        n = blocks.q.shape[0]
        s6 = (blocks.sc + 32).astype(np.uint8)
        scales = np.concatenate([_interleave((s6 & 15).reshape(n, 2, 8), 4),
                                 _interleave((s6 >> 4).reshape(n, 4, 4), 2)], axis=1)
        return np.concatenate([_pack_bit_planes(blocks.q >> 2), _pack_2bit_halves(blocks.q & 3), scales,
                               _f16_bytes(blocks.d)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        hmask, qs, scales, d = _split(raw, (32, 64, 12, 2))
        n = raw.shape[0]
        s6 = (_deinterleave(scales[:, :8], 2, 4).reshape(n, 16)
              | (_deinterleave(scales[:, 8:], 4, 2).reshape(n, 16) << 4))
        q = _unpack_2bit_halves(qs) | (_unpack_bit_planes(hmask) << 2)
        return BlockFields(q=q, d=_f16_values(d), sc=s6.astype(np.int32) - 32)


class Q4_K(_AsymmetricKQuant, name="q4_k", ggml_type=T.Q4_K):
    """``d | dmin | scales[12] | qs[128]`` (144 B); groups of 32, ``w = d*sc*q - dmin*m``.

    q in 0..15; 6-bit sc and m in the 12 scale bytes (:func:`_pack_k4_scales`); codes as
    :func:`_pack_k_nibbles`.
    """

    group_size = 32
    bits = 4
    levels = torch.arange(16, dtype=torch.float32)
    sc_range = (0, 63)
    m_range = (0, 63)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, dmin, scales, qs]``."""
        assert blocks.sc is not None and blocks.m is not None and blocks.dmin is not None
        return np.concatenate([_f16_bytes(blocks.d), _f16_bytes(blocks.dmin),
                               _pack_k4_scales(blocks.sc, blocks.m), _pack_k_nibbles(blocks.q)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        d, dmin, scales, qs = _split(raw, (2, 2, 12, 128))
        sc, m = _unpack_k4_scales(scales)
        return BlockFields(q=_unpack_k_nibbles(qs), d=_f16_values(d), dmin=_f16_values(dmin), sc=sc, m=m)


class Q5_K(_AsymmetricKQuant, name="q5_k", ggml_type=T.Q5_K):
    """``d | dmin | scales[12] | qh[32] | qs[128]`` (176 B); as Q4_K with q in 0..31, bit 4 in qh planes."""

    group_size = 32
    bits = 5
    levels = torch.arange(32, dtype=torch.float32)
    sc_range = (0, 63)
    m_range = (0, 63)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[d, dmin, scales, qh, qs]``."""
        assert blocks.sc is not None and blocks.m is not None and blocks.dmin is not None
        return np.concatenate([_f16_bytes(blocks.d), _f16_bytes(blocks.dmin),
                               _pack_k4_scales(blocks.sc, blocks.m), _pack_bit_planes(blocks.q >> 4),
                               _pack_k_nibbles(blocks.q & 15)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        d, dmin, scales, qh, qs = _split(raw, (2, 2, 12, 32, 128))
        sc, m = _unpack_k4_scales(scales)
        q = _unpack_k_nibbles(qs) | (_unpack_bit_planes(qh) << 4)
        return BlockFields(q=q, d=_f16_values(d), dmin=_f16_values(dmin), sc=sc, m=m)


class Q6_K(_SymmetricKQuant, name="q6_k", ggml_type=T.Q6_K):
    """``ql[128] | qh[64] | int8 scales[16] | d`` (210 B); groups of 16, ``w = d*sc*(q-32)``, q in 0..63.

    With ``h = i div 128``, ``s = (i mod 128) div 32``, ``l = i mod 32``: the low 4 bits of q sit in
    ``ql[64h + 32*(s mod 2) + l]`` (high nibble when s >= 2), the high 2 bits in ``qh[32h + l]`` at bit
    ``2s``.
    """

    group_size = 16
    bits = 6
    levels = torch.arange(64, dtype=torch.float32) - 32
    sc_range = (-128, 127)

    @classmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``[ql, qh, scales, d]``."""
        assert blocks.sc is not None
        n = blocks.q.shape[0]
        q = blocks.q.reshape(n, 2, 2, 2, 32)  # (h, s div 2, s mod 2, l)
        ql = _interleave(np.swapaxes(q & 15, -3, -2), 4).reshape(n, 128)  # nibble = s div 2
        qh = _interleave((blocks.q >> 4).reshape(n, 2, 4, 32), 2).reshape(n, 64)  # bits 2s..2s+1
        scales = blocks.sc.astype(np.int8).view(np.uint8)
        return np.concatenate([ql, qh, scales, _f16_bytes(blocks.d)], axis=1)

    @classmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks`."""
        ql, qh, scales, d = _split(raw, (128, 64, 16, 2))
        n = raw.shape[0]
        low = np.swapaxes(_deinterleave(ql.reshape(n, 2, 2, 32), 2, 4), -3, -2).reshape(n, 256)
        high = _deinterleave(qh.reshape(n, 2, 32), 4, 2).reshape(n, 256)
        sc = np.ascontiguousarray(scales).view(np.int8).astype(np.int32)
        return BlockFields(q=low | (high << 4), d=_f16_values(d), sc=sc)
