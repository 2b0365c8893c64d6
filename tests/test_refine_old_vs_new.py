"""Temporary: the one refinement (``refine_params``) against the two it replaces, bit for bit."""

from __future__ import annotations

import pytest
import torch

from turboboa.formats.base import get_format
from turboboa.formats.spec import format_spec
from turboboa.grids import BlockGrid, GridSpec
from turboboa.solvers.gptq import gptq_quantize
from turboboa.solvers.refine import refine_format_scales, refine_params, refine_scales
from turboboa.solvers.rtn import rtn_quantize


def spd(n: int, gen: torch.Generator, dtype: torch.dtype, batch: int = 1) -> torch.Tensor:
    X = torch.randn(batch, n, 4 * n, generator=gen, dtype=dtype) + 0.5 * torch.randn(batch, n, 1, generator=gen, dtype=dtype)
    return X @ X.transpose(-1, -2) / (4 * n) + 0.01 * torch.eye(n, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size,C", [(-1, 48), (8, 48), (16, 50), (32, 96)])
@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("shared_h", [False, True])
@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_grid_is_unchanged(dtype, group_size, C, coupled, shared_h, iters, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    B, R = 3, 12
    W = torch.randn(B, R, C, generator=gen, dtype=dtype)
    H = spd(C, gen, dtype, 1 if shared_h else B)
    H_row = spd(R, gen, dtype, B) if coupled else None
    spec = GridSpec(bits=3, search=seed == 1)
    res = gptq_quantize(W, H.expand(B, C, C), spec, group_size)
    target = W + 0.05 * torch.randn(B, R, C, generator=gen, dtype=dtype)
    scale, Q = refine_scales(target, res.codes, res.scale, res.zero, H, H_row, group_size, iters)
    grid, Qn = refine_params(spec, target, res.codes, BlockGrid(res.scale, res.zero), H, H_row, group_size, iters)
    assert grid.scale.dtype == scale.dtype
    assert torch.equal(grid.scale, scale)
    assert torch.equal(grid.offset, res.zero)
    assert torch.equal(Qn, Q)


FORMATS = ["q4_0", "q4_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "iq2_xs", "iq3_xxs",
           "iq1_m", "lpbq4", "lpbq4_g64"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_formats_are_unchanged(fmt, coupled, iters, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    B, R, C = 2, 16, 512
    W = 0.05 * torch.randn(B, R, C, generator=gen)
    W[0, 3] = 0
    H = spd(C, gen, torch.float32, 1)
    H_row = spd(R, gen, torch.float32, B) if coupled else None
    spec = format_spec(fmt)
    G = spec.fmt.group_size
    res = gptq_quantize(W, H.expand(B, C, C), spec, G) if seed == 0 else rtn_quantize(W, spec, G, H)
    target = W + 0.01 * torch.randn(B, R, C, generator=gen)
    old_grid, Q = refine_format_scales(get_format(fmt), target, res.codes, res.stored, H, H_row, iters)
    grid, Qn = refine_params(spec, target, res.codes, BlockGrid(res.scale, res.zero, res.stored), H, H_row, G, iters)
    assert grid.stored.equal(old_grid)
    assert torch.equal(Qn, Q)
