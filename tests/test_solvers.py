"""Solvers against brute force and identities on small random problems (float64 where exactness matters)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from turboboa.blockwise import quantize_layer
from turboboa.config import QuantConfig
from turboboa.configs.solvers import BoAConfig, GPTQConfig, RTNConfig, SolverConfig, TurboBoAConfig
from turboboa.formats.codebook import CodebookSpec
from turboboa.formats.lpbq import LpbqSpec
from turboboa.formats.spec import FormatSpec
from turboboa.grids import BlockGrid, GridSpec, dequantize, expand_groups, fit_grid, quantize_codes
from turboboa.quantized import QuantizedLinear
from turboboa.solvers import LayerProblem, shifted_target, solve_layer
from turboboa.solvers.boa import row_compensation
from turboboa.solvers.gptq import gptq_quantize
from turboboa.solvers.linalg import cholesky_inverse_upper
from turboboa.solvers.refine import kron_objective, refine_params
from turboboa.solvers.rtn import rtn_quantize


def correlated_inputs(d_in: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, d_in, generator=g, dtype=dtype) / d_in**0.5 + torch.eye(d_in, dtype=dtype)
    scales = torch.rand(d_in, generator=g, dtype=dtype) * 3 + 0.1
    return (torch.randn(n, d_in, generator=g, dtype=dtype) @ A) * scales


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def random_spd(d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 2 * d, generator=g, dtype=dtype)
    return A @ A.T / (2 * d) + 0.1 * torch.eye(d, dtype=dtype)


def naive_gptq(W: torch.Tensor, H: torch.Tensor, spec: GridSpec, group_size: int) -> torch.Tensor:
    """GPTQ column by column, every later column updated right away (no lazy batches)."""
    W = W.clone()
    U, _ = cholesky_inverse_upper(H.unsqueeze(0), 0.01)
    U = U[0]
    C = W.shape[1]
    G = group_size if group_size > 0 else C
    Q = torch.zeros_like(W)
    for j in range(C):
        if j % G == 0:
            s, z = fit_grid(W[:, j : j + G], spec)
        q = dequantize(quantize_codes(W[:, j], s, z, spec.maxq), s, z)
        Q[:, j] = q
        e = (W[:, j] - q) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    return Q


@pytest.mark.parametrize("group_size", [-1, 16])
def test_gptq_lazy_batches_equal_column_by_column(group_size):
    X = correlated_inputs(64, 512, 0)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spec = GridSpec(bits=3)
    ref = naive_gptq(W, hessian(X), spec, group_size)
    res = gptq_quantize(W, hessian(X), spec, group_size, block_size=32)
    assert torch.allclose(res.Q, ref, atol=1e-10)


def layer_error(W, Q, X):
    return ((Q - W) @ X.T).pow(2).sum().item()


@pytest.mark.parametrize("bits,group_size", [(3, -1), (4, 32), (2, -1)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    X = correlated_inputs(128, 2048, 2, torch.float32)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    H = hessian(X)
    spec = GridSpec(bits=bits)
    q_gptq = gptq_quantize(W, H, spec, group_size).Q
    q_rtn = rtn_quantize(W.unsqueeze(0), spec, group_size).Q[0]
    assert layer_error(W, q_gptq, X) < 0.8 * layer_error(W, q_rtn, X)


def test_gptq_act_order_and_dead_inputs():
    X = correlated_inputs(64, 512, 4)
    X[:, 5] = 0  # a dead input
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    H = hessian(X)
    spec = GridSpec(bits=4)
    plain = gptq_quantize(W, H, spec, 16, static_groups=True)
    ordered = gptq_quantize(W, H, spec, 16, act_order=True)
    assert torch.all(ordered.Q[:, 5] == 0) and torch.all(plain.Q[:, 5] == 0)
    # act-order uses the same static grids; its objective stays in the same range as the plain order's
    assert torch.equal(plain.scale, ordered.scale)
    assert layer_error(W, ordered.Q, X) < 1.5 * layer_error(W, plain.Q, X)
    # codes decode to Q with the one dequantizer
    assert torch.equal(dequantize(ordered.codes, ordered.scale.repeat_interleave(16, 1),
                                  ordered.zero.repeat_interleave(16, 1)), ordered.Q)


def boa_problem(seed: int, heads=3, d_h=8, d_in=32, identity_row=False, dtype=torch.float64) -> LayerProblem:
    X = correlated_inputs(d_in, 400, seed, dtype)
    W = torch.randn(heads * d_h, d_in, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    if identity_row:
        H_row = torch.eye(d_h, dtype=dtype).expand(heads, d_h, d_h).clone()
    else:
        H_row = torch.stack([random_spd(d_h, seed + 10 + h, dtype) for h in range(heads)])
    return LayerProblem("test", W, hessian(X), H_row, heads)


def solve(p: LayerProblem, config: SolverConfig, group_size: int = -1, search: bool = False,
          bits: int = 3) -> QuantizedLinear:
    """``p`` solved with the method configuration ``config`` onto the uniform asymmetric grid of ``bits``."""
    return solve_layer(p, config, GridSpec(bits=bits, search=search), group_size)


@pytest.mark.parametrize("group_size", [-1, 8])
def test_turboboa_with_one_row_and_f2_f3_off_equals_boa(group_size):
    p = boa_problem(0)
    p.cross = 0.1 * random_spd(p.W.shape[1], 99)
    boa = solve(p, BoAConfig(), group_size, search=True)
    turbo = solve(p, TurboBoAConfig(rows=1, use_dx=False, adaptive_grid=False, refine_iters=0), group_size,
                  search=True)
    assert torch.equal(boa.codes, turbo.codes) and torch.equal(boa.scale, turbo.scale)
    # and F2/F3 do change the result
    full = solve(p, TurboBoAConfig(rows=1), group_size, search=True)
    assert not torch.equal(full.scale, boa.scale)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 8])
def test_boa_with_identity_row_hessian_equals_gptq(group_size, act_order):
    p = boa_problem(1, identity_row=True)
    boa = solve(p, BoAConfig(act_order_col=act_order), group_size)
    gptq = solve(p, GPTQConfig(static_groups=True, act_order=act_order, use_dx=False), group_size)
    assert torch.equal(boa.codes, gptq.codes)
    assert torch.allclose(boa.dequantize(), gptq.dequantize(), atol=0, rtol=0)


def test_n_row_compensation_is_least_squares_optimum():
    """Brute force on the full Kronecker objective: later rows at their optimum given the quantized block."""
    d, C, N = 5, 3, 2
    H_row, H_col = random_spd(d, 1), random_spd(C, 2)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(d, C, generator=g, dtype=torch.float64)
    Q_blk = W[:N] + 0.3 * torch.randn(N, C, generator=g, dtype=torch.float64)
    U_row, _ = cholesky_inverse_upper(H_row.unsqueeze(0), 0.0)
    W_rest = W[N:] - row_compensation(U_row, slice(0, N), slice(N, d), (W[:N] - Q_blk).unsqueeze(0))[0]
    # brute force: minimize vec(D)^T (H_row kron H_col) vec(D) over the free entries D[N:, :]
    K = torch.kron(H_row, H_col)
    free = torch.arange(N * C, d * C)
    fixed = torch.arange(0, N * C)
    D_fixed = (Q_blk - W[:N]).reshape(-1)
    D_free = -torch.linalg.solve(K[free][:, free], K[free][:, fixed] @ D_fixed)
    assert torch.allclose(W_rest, W[N:] + D_free.reshape(d - N, C), atol=1e-10)


def test_n_rows_turboboa_lowers_attention_objective_vs_gptq():
    p = boa_problem(4, heads=2, d_h=16, d_in=48)
    gptq = solve(p, GPTQConfig(act_order=False))  # both in the natural column order
    turbo = solve(p, TurboBoAConfig(rows=4, act_order_col=False, use_dx=False, refine_iters=0, adaptive_grid=False))
    Wh = p.W.reshape(2, 16, 48)

    def obj(q):
        return kron_objective(Wh, q.dequantize().reshape(2, 16, 48).double(), p.H.unsqueeze(0), p.H_row).item()

    assert obj(turbo) < obj(gptq)


@pytest.mark.parametrize("group_size,with_row", [(-1, True), (8, True), (-1, False), (8, False)])
def test_scale_refinement_never_increases_objective(group_size, with_row):
    p = boa_problem(5, identity_row=not with_row)
    heads, d_h, C = 3, 8, p.W.shape[1]
    Wh = p.W.reshape(heads, d_h, C)
    spec = GridSpec(bits=3)
    res = rtn_quantize(Wh, spec, group_size)
    H = p.H.unsqueeze(0)
    H_row = p.H_row if with_row else None
    before = kron_objective(Wh, res.Q, H, H_row)
    grid = BlockGrid(res.scale, res.zero)
    prev = before
    for _ in range(3):
        grid, Q = refine_params(spec, Wh, res.codes, grid, H, H_row, group_size, iters=1)
        assert torch.equal(grid.offset, res.zero)
        now = kron_objective(Wh, Q, H, H_row)
        assert now <= prev + 1e-9 * abs(prev)
        prev = now
    assert prev < 0.95 * before


@pytest.mark.parametrize("group_size", [-1, 16, 20])
def test_scale_refinement_finds_the_optimal_scales_of_a_per_row_problem(group_size):
    """Identity Hessians: with the codes fixed, each (row, group) scale's optimum is <w, z - z0> / |z - z0|^2
    (a ragged last group included), reached in one step."""
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(2, 5, 48, generator=gen, dtype=torch.float64)
    spec = GridSpec(bits=3)
    res = rtn_quantize(W, spec, group_size)
    grid, Q = refine_params(spec, W, res.codes, BlockGrid(res.scale, res.zero),
                            torch.eye(48, dtype=torch.float64)[None], None, group_size)
    G = group_size if group_size > 0 else 48
    for g0 in range(0, 48, G):
        zc = res.codes[..., g0 : g0 + G] - res.zero[..., g0 // G, None]
        best = (W[..., g0 : g0 + G] * zc).sum(-1) / (zc * zc).sum(-1)
        assert torch.allclose(grid.scale[..., g0 // G], best, rtol=1e-12, atol=0)
    assert torch.equal(Q, dequantize(res.codes, expand_groups(grid.scale, group_size, 48),
                                     expand_groups(res.zero, group_size, 48)))


def test_f2_shift_is_the_minimizer_and_vanishes_without_deviation():
    X = correlated_inputs(16, 300, 6)
    dX = 0.1 * correlated_inputs(16, 300, 7)
    X_fp = X + dX
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    H = hessian(X)
    C = 2 * dX.T @ X / X.shape[0]
    Wp = shifted_target(W, W @ C, H, 1.0)
    lstsq = W @ X_fp.T @ X @ torch.linalg.inv(X.T @ X)  # argmin_Q ||Q X - W X_fp||^2 (rows as tokens here)
    assert torch.allclose(Wp, lstsq, atol=1e-10)
    # F2 with zero input deviation equals no F2
    p = boa_problem(6)
    base = TurboBoAConfig(rows=4)
    no_dx = solve(p, dataclasses.replace(base, use_dx=False), 8)
    p.cross = torch.zeros_like(p.H)
    zero_dx = solve(p, base, 8)
    assert torch.equal(no_dx.codes, zero_dx.codes) and torch.equal(no_dx.scale, zero_dx.scale)


def test_f2_reduces_error_against_full_precision_outputs():
    X = correlated_inputs(32, 600, 9, torch.float32)
    dX = 0.3 * correlated_inputs(32, 600, 10, torch.float32)
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(11))
    H = hessian(X)
    C = 2 * dX.T @ X / X.shape[0]
    p = LayerProblem("l", W, H, None, 1, C)
    base = TurboBoAConfig(refine_iters=0, alpha=1.0)
    with_dx = solve(p, base, bits=4).dequantize()
    without = solve(p, dataclasses.replace(base, use_dx=False), bits=4).dequantize()

    def err(Q):
        return (X @ Q.T - (X + dX) @ W.T).pow(2).sum().item()

    assert err(with_dx) < err(without)


def test_failed_cholesky_retries_with_more_damping():
    X = correlated_inputs(16, 8, 12)  # fewer tokens than inputs: H is singular
    H = hessian(X) - 1e-3 * torch.eye(16, dtype=torch.float64)  # and slightly indefinite
    assert torch.linalg.cholesky_ex(H).info > 0
    U, Hd = cholesky_inverse_upper(H.unsqueeze(0), 0.0)
    assert torch.isfinite(U).all()
    lam = (Hd[0] - H).diagonal()
    assert torch.all(lam > 0) and torch.allclose(lam, lam[0].expand(16))
    assert torch.allclose(U[0].T @ U[0], torch.linalg.inv(Hd[0]), atol=1e-6)


def test_every_layer_format_names_a_solver_grid():
    """Format "int" is the config's uniform grid, a storage format its own grid and group (LPBQ's and the
    i-quants' spec classes included), with the config's range-search choice."""
    c = QuantConfig(method="turboboa", bits=3, group_size=32, sym=True)
    assert c.solver_grid("int") == (c.grid_spec(), 32)
    for fmt, cls, G in (("q4_k", FormatSpec, 32), ("lpbq4", LpbqSpec, 32), ("iq2_xs", CodebookSpec, 16)):
        spec, group = c.solver_grid(fmt)
        assert type(spec) is cls and spec.fmt_name == fmt and group == G and spec.search


@pytest.mark.parametrize("method,config", [("rtn", RTNConfig), ("gptq", GPTQConfig), ("boa", BoAConfig),
                                           ("turboboa", TurboBoAConfig)])
def test_each_solver_takes_only_its_method_configuration(method, config):
    """A QuantConfig hands each solver its method's configuration, whose fields are the settings that solver
    reads; the block loop's result is the solver's on the layer's grid, and the whole QuantConfig is refused."""
    cfg = QuantConfig(method=method, bits=3, group_size=8, rows=4, percdamp=0.1)
    own = cfg.solver_config()
    assert type(own) is config and own.percdamp == 0.1
    assert {f.name for f in dataclasses.fields(own)} < {f.name for f in dataclasses.fields(cfg)}
    p = boa_problem(7)
    if method in ("gptq", "rtn"):
        p.H_row, p.heads = None, 1
    q = quantize_layer(p, cfg)
    grid, group_size = cfg.solver_grid("int")
    assert torch.equal(q.codes, solve_layer(p, own, grid, group_size).codes)
    with pytest.raises(TypeError, match="method's configuration"):
        solve_layer(p, cfg, grid, group_size)


def test_failed_cholesky_in_place_damping_restores_the_diagonal_between_retries():
    """``overwrite=True`` damps the caller's copy in place; each retry starts again from the undamped diagonal,
    so U and the damped H are those of the copying path, bit for bit."""
    X = correlated_inputs(16, 8, 12)
    H = (hessian(X) - 1e-3 * torch.eye(16, dtype=torch.float64)).unsqueeze(0)
    U, Hd = cholesky_inverse_upper(H, 0.0)
    own = H.clone()
    U2, Hd2 = cholesky_inverse_upper(own, 0.0, overwrite=True)
    assert Hd2.data_ptr() == own.data_ptr() and torch.equal(U2, U) and torch.equal(Hd2, Hd)


@pytest.mark.parametrize("config", [RTNConfig(), GPTQConfig(act_order=True), GPTQConfig(act_order=False),
                                    BoAConfig(), TurboBoAConfig(rows=4)], ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("with_cross", [False, True])
def test_an_owned_problem_gives_the_same_layer_and_a_lent_one_is_left_untouched(config, with_cross):
    """The block loop hands its statistics over (``owned``: the solver overwrites and lets go of H and C); a
    caller's own H and C are never written. Both give the same codes and grids."""
    p = boa_problem(5, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    p.cross = 0.01 * torch.randn(p.H.shape, generator=g) if with_cross else None
    p.H[:, 3] = p.H[3, :] = 0.0  # a dead input
    H0, C0 = p.H.clone(), None if p.cross is None else p.cross.clone()
    lent = solve(p, config, group_size=8)
    assert torch.equal(p.H, H0) and (C0 is None or torch.equal(p.cross, C0))
    owned = dataclasses.replace(p, H=H0.clone(), cross=None if C0 is None else C0.clone(), owned=True)
    got = solve(owned, config, group_size=8)
    assert owned.H is None and (owned.cross is None or isinstance(config, RTNConfig))  # RTN reads no cross term
    assert torch.equal(got.codes, lent.codes) and torch.equal(got.scale, lent.scale)
    assert torch.equal(got.zero, lent.zero)
