"""ggml storage formats: our bytes decode bit-identically with ``gguf.quants``, round-trip, and grids snap.

Every check is exact (``np.array_equal`` on float32) except the snap accuracy bounds, which follow from the
sub-scale resolution: a group scale snapped to a multiple of the fp16 super-scale ``d`` is off by at most
``|d| / 2`` (one clamp step ``|d|`` for a signed group opposite to the anchor), and ``d`` itself is the
fp16 rounding of ``anchor / S``, relative error <= 2^-11.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from turboboa.errors import UserError
from turboboa.formats import GgmlFormat, GgmlGrid, format_names, get_format

ALL = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
GGUF_QUANTIZABLE = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
FP16_EPS = 2.0**-11  # relative rounding error of a normal fp16


def _random_fp16(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random finite fp16 values as float32: every exponent (subnormals, zeros, ..., 65504), both signs."""
    bits = torch.randint(0, 0x7C00, shape, generator=gen, dtype=torch.int32)
    bits |= torch.randint(0, 2, shape, generator=gen, dtype=torch.int32) << 15
    return torch.from_numpy(bits.numpy().astype(np.uint16).view(np.float16).astype(np.float32))


def _random_stored(fmt: type[GgmlFormat], rows: int, cols: int, seed: int) -> tuple[torch.Tensor, GgmlGrid]:
    """Random codes and stored grid, with all-zero blocks/groups, sc = 0, signed d and extreme codes."""
    gen = torch.Generator().manual_seed(seed)
    nb, ng = cols // fmt.block_size, cols // fmt.group_size
    codes = torch.randint(0, fmt.code_max() + 1, (rows, cols), generator=gen).to(torch.uint8)
    codes[0, : fmt.block_size] = 0
    codes[1, : fmt.block_size] = fmt.code_max()
    d = _random_fp16((rows, nb), gen)
    d[0, -1] = 0.0
    d[1, 0] = -abs(float(d[1, 0])) or -1.0
    dmin = _random_fp16((rows, nb), gen) if fmt.asymmetric else None
    if dmin is not None:
        dmin[1, -1] = 0.0

    def ints(rng: tuple[int, int] | None) -> torch.Tensor | None:
        if rng is None:
            return None
        t = torch.randint(rng[0], rng[1] + 1, (rows, ng), generator=gen, dtype=torch.int32)
        t[0, 0] = 0
        t[-1, 0], t[-1, -1] = rng[0], rng[1]
        return t

    return codes, GgmlGrid(d=d, dmin=dmin, sc=ints(fmt.sc_range), m=ints(fmt.m_range))


def _realistic_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian weights with per-row spread, a few outliers and an all-zero block."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * (0.01 + 0.05 * torch.rand(rows, 1, generator=gen))
    w[0, 3] = 0.5
    w[1, :32] = 0.0
    return w


def test_registry_lists_all_types() -> None:
    from turboboa.formats.iquant import CODEBOOK_FORMATS, I_QUANTS

    assert set(format_names()) == set(ALL) | set(I_QUANTS)
    for name in (*ALL, *I_QUANTS):
        fmt = get_format(name)
        assert fmt.name == name and fmt.ggml_type.name.lower() == name
        assert fmt.bpw == 8 * fmt.type_size / fmt.block_size
        # one code per level; the codebooks' sign-magnitude tables (IQ2: 6 levels) fill fewer codes
        assert fmt.levels.dtype == torch.float32
        assert fmt.levels.numel() <= 2**fmt.bits if name in CODEBOOK_FORMATS else fmt.levels.numel() == 2**fmt.bits
    assert get_format("Q4_K") is get_format("q4_k")


@pytest.mark.parametrize("name", ALL)
def test_pack_decodes_bit_identically_with_gguf(name: str) -> None:
    fmt = get_format(name)
    rows, cols = 4, 2 * fmt.block_size
    for seed in range(3):
        codes, grid = _random_stored(fmt, rows, cols, seed)
        raw = fmt.pack(codes, grid)
        assert raw.dtype == np.uint8 and raw.shape == (rows, fmt.row_bytes(cols))
        ref = gguf_dequantize(raw, fmt.ggml_type)
        ours = fmt.dequantize(codes, grid)
        assert ours.dtype == torch.float32 and ref.shape == (rows, cols)
        assert np.array_equal(ref.astype(np.float32), ours.numpy())


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q6_k", "iq4_nl"])
def test_dequantize_in_row_chunks_is_bit_identical(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big table is dequantized a few rows at a time (small temporaries): the same values as gguf's."""
    from turboboa.formats import base

    fmt = get_format(name)
    rows, cols = 37, 2 * fmt.block_size
    codes, grid = _random_stored(fmt, rows, cols, seed=3)
    monkeypatch.setattr(base, "DEQUANT_ELEMENTS", 3 * cols + 1)  # 3 rows per step, 13 steps
    ref = gguf_dequantize(fmt.pack(codes, grid), fmt.ggml_type)
    assert np.array_equal(ref.astype(np.float32), fmt.dequantize(codes, grid).numpy())


@pytest.mark.parametrize("name", ALL)
def test_unpack_inverts_pack(name: str) -> None:
    fmt = get_format(name)
    codes, grid = _random_stored(fmt, 3, 2 * fmt.block_size, seed=7)
    raw = fmt.pack(codes, grid)
    codes2, grid2 = fmt.unpack(raw)
    assert codes2.dtype == torch.uint8 and torch.equal(codes2, codes)
    assert grid2.equal(grid)
    assert np.array_equal(fmt.pack(codes2, grid2), raw)  # also keeps the sign of a zero d


@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_gguf_quantized_bytes_repack_identically(name: str) -> None:
    fmt = get_format(name)
    w = _realistic_weights(5, 4 * fmt.block_size, seed=1).numpy()
    raw = gguf_quantize(w, fmt.ggml_type)
    codes, grid = fmt.unpack(raw)
    assert np.array_equal(fmt.pack(codes, grid), raw)
    assert np.array_equal(fmt.dequantize(codes, grid).numpy(), gguf_dequantize(raw, fmt.ggml_type))


def _fp16_ok(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all()) and torch.equal(x.half().float(), x)


@pytest.mark.parametrize("name", ALL)
def test_snap_gives_stored_grid_close_to_request(name: str) -> None:
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(3)
    rows, ng = 6, 2 * fmt.block_size // fmt.group_size
    scale = torch.exp(torch.empty(rows, ng).uniform_(-4, -1, generator=gen))  # 0.018..0.37: d a normal fp16
    spread = torch.empty(rows, ng).uniform_(0, 2**fmt.bits - 1, generator=gen)
    offset = scale * spread if fmt.asymmetric else None
    grid = fmt.snap(scale, offset)
    assert _fp16_ok(grid.d) and (grid.dmin is None or _fp16_ok(grid.dmin))
    s, o = fmt.group_scale_offset(grid)
    assert s.shape == o.shape == (rows, ng)
    if fmt.sc_range is None:  # 32-blocks: d (and Q4_1's min) are the fp16 roundings of the request
        assert torch.all((s - scale).abs() <= FP16_EPS * scale)
        if offset is not None:
            assert torch.all((o - offset).abs() <= FP16_EPS * offset)
    else:
        assert grid.sc is not None and grid.sc.dtype in (torch.int16, torch.int32)
        lo, hi = fmt.sc_range
        assert int(grid.sc.min()) >= lo and int(grid.sc.max()) <= hi
        d = grid.d.repeat_interleave(fmt.groups_per_block, dim=-1)
        assert torch.all((s - scale).abs() <= 0.5 * d.abs() * (1 + 1e-6))
        anchor = scale.reshape(rows, -1, fmt.groups_per_block).amax(-1)
        n_anchor = hi if fmt.asymmetric else lo  # largest group -> 63/15, or -> -32/-128 (d < 0)
        assert torch.all((grid.d - anchor / n_anchor).abs() <= FP16_EPS * anchor / abs(n_anchor))
        if not fmt.asymmetric:
            assert torch.all(grid.d < 0)
            assert torch.all(grid.sc.reshape(rows, -1, fmt.groups_per_block).amin(-1) == lo)
        else:
            assert grid.m is not None and grid.dmin is not None and fmt.m_range is not None
            assert int(grid.m.min()) >= 0 and int(grid.m.max()) <= fmt.m_range[1]
            dmin = grid.dmin.repeat_interleave(fmt.groups_per_block, dim=-1)
            assert torch.all((o - offset).abs() <= 0.5 * dmin * (1 + 1e-6))

    # all-zero request: zeros, no NaN; the grid packs
    zero = fmt.snap(torch.zeros(rows, ng), torch.zeros(rows, ng) if fmt.asymmetric else None)
    for t in (zero.d, zero.dmin, zero.sc, zero.m):
        assert t is None or (bool(torch.isfinite(t.float()).all()) and not bool(t.any()))
    fmt.pack(torch.zeros(rows, ng * fmt.group_size, dtype=torch.uint8), zero)


@pytest.mark.parametrize("name", ["q3_k", "q6_k"])
def test_snap_signed_kquant_maps_largest_magnitude_to_most_negative(name: str) -> None:
    fmt = get_format(name)
    assert fmt.sc_range is not None
    scale = torch.zeros(2, fmt.groups_per_block)
    scale[0, :] = torch.linspace(-0.01, 0.004, fmt.groups_per_block)  # anchor -0.01 -> d > 0
    scale[1, 3] = 0.02
    grid = fmt.snap(scale)
    assert grid.sc is not None
    assert float(grid.d[0, 0]) > 0 and int(grid.sc[0, 0]) == fmt.sc_range[0]
    assert float(grid.d[1, 0]) < 0 and int(grid.sc[1, 3]) == fmt.sc_range[0] and int(grid.sc[1, 0]) == 0


@pytest.mark.parametrize("name", ["q2_k", "q4_k", "q5_k"])
def test_snap_clamps_negative_offsets_and_scales(name: str) -> None:
    fmt = get_format(name)
    ng = fmt.groups_per_block
    scale = torch.full((1, ng), 0.01)
    scale[0, 0] = -0.5
    offset = torch.full((1, ng), -0.3)  # group min > 0: grid starts at 0
    grid = fmt.snap(scale, offset)
    assert grid.sc is not None and grid.m is not None and grid.dmin is not None
    assert int(grid.sc[0, 0]) == 0 and not bool(grid.m.any()) and float(grid.dmin[0, 0]) == 0.0


def _brute_force_nearest(fmt: type[GgmlFormat], w: torch.Tensor, scale: torch.Tensor,
                         offset: torch.Tensor) -> torch.Tensor:
    """min over all levels of ``|w - (scale*level - offset)|``, elementwise (scale/offset expanded to w)."""
    v = scale.unsqueeze(-1) * fmt.levels
    v = v - offset.unsqueeze(-1)
    return (w.unsqueeze(-1) - v).abs().amin(-1)


@pytest.mark.parametrize("name", ALL)
def test_quantize_codes_picks_the_nearest_level(name: str) -> None:
    fmt = get_format(name)
    rows, cols = 4, fmt.block_size
    w = _realistic_weights(rows, cols, seed=5) * 2
    ng = cols // fmt.group_size
    gen = torch.Generator().manual_seed(11)
    scale = torch.exp(torch.empty(rows, ng).uniform_(-7, -3, generator=gen))
    offset = scale * (2**fmt.bits) / 2 if fmt.asymmetric else None
    grid = fmt.snap(scale, offset)
    if grid.sc is not None:
        grid.sc[0, 0] = 0  # a group that decodes to a constant
    s, o = fmt.group_scale_offset(grid)
    codes = fmt.quantize_codes(w, s, o)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) <= fmt.code_max()
    s_e, o_e = (t.repeat_interleave(fmt.group_size, dim=-1) for t in (s, o))
    best = _brute_force_nearest(fmt, w, s_e, o_e)
    assert torch.equal((w - fmt.dequantize(codes, grid)).abs(), best)
    # one column at a time (GPTQ) gives the same codes
    for j in (0, cols // 2 + 1, cols - 1):
        assert torch.equal(fmt.quantize_codes(w[:, j], s_e[:, j], o_e[:, j]), codes[:, j])


@pytest.mark.parametrize("name", ALL)
def test_snap_quantize_pack_matches_gguf(name: str) -> None:
    """The solver path: snap per-group min-max scales, round, pack; gguf decodes exactly our fake-quant."""
    fmt = get_format(name)
    w = _realistic_weights(3, 2 * fmt.block_size, seed=9)
    g = w.reshape(3, -1, fmt.group_size)
    if fmt.asymmetric:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1)
        grid = fmt.snap((hi - lo) / (fmt.levels[-1] - fmt.levels[0]), -lo)
    else:
        grid = fmt.snap(g.abs().amax(-1) / fmt.levels.abs().max())
    s, o = fmt.group_scale_offset(grid)
    codes = fmt.quantize_codes(w, s, o)
    w_hat = fmt.dequantize(codes, grid)
    assert np.array_equal(gguf_dequantize(fmt.pack(codes, grid), fmt.ggml_type), w_hat.numpy())
    assert float((w_hat - w).abs().max()) <= float(w.abs().max())


def test_unknown_name_and_bad_width_are_user_errors() -> None:
    with pytest.raises(UserError, match="q4_k"):
        get_format("q7_z")
    for name, cols in (("q4_0", 48), ("q4_k", 288), ("q6_k", 576)):
        fmt = get_format(name)
        assert not fmt.supports_width(cols) and fmt.supports_width(2 * fmt.block_size)
        codes = torch.zeros(2, cols, dtype=torch.uint8)
        with pytest.raises(UserError, match=str(fmt.block_size)):
            fmt.pack(codes, GgmlGrid(d=torch.zeros(2, 1)))
    with pytest.raises(UserError):
        get_format("q4_k").snap(torch.ones(2, 9), torch.zeros(2, 9))


def test_out_of_range_grid_is_rejected() -> None:
    fmt = get_format("q4_k")
    codes, grid = _random_stored(fmt, 2, 256, seed=0)
    assert grid.sc is not None
    bad_sc = grid.sc.clone()
    bad_sc[0, 0] = 64
    with pytest.raises(ValueError, match="sc"):
        fmt.pack(codes, GgmlGrid(d=grid.d, dmin=grid.dmin, sc=bad_sc, m=grid.m))
    with pytest.raises(ValueError, match="fp16"):
        fmt.pack(codes, GgmlGrid(d=grid.d + 1e-4, dmin=grid.dmin, sc=grid.sc, m=grid.m))
