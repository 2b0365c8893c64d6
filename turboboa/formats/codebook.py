"""``CodebookSpec``: an i-quant codebook (IQ1, IQ2, IQ3) as the grid a solver quantizes onto.

A codeword covers ``v = dim`` consecutive columns of one row (8, or 4 for IQ3), so the solvers choose it
jointly (vector rounding, as GPTVQ does for vector quantization). With ``S`` the sub-block scale
``d (2 ls + 1)``, a candidate is ``q = S * c`` where ``c`` is a grid entry with the type's signs
(:mod:`turboboa.formats.iquant`), and its error under a ``v x v`` metric ``M`` is

    L(c) = (w - S c) M (w - S c)^T = const - 2 S c (M w)  +  S^2 c M c^T.

Under GPTQ, ``M = (U_JJ^T U_JJ)^-1`` for the codeword's columns ``J`` (``U = chol(H^-1)^T``, the Cholesky
factor of the inverse Hessian of the columns not yet quantized): the exact increase of the layer loss when
``w_J`` is rounded and every later column is compensated. RTN uses the diagonal block ``H_JJ``.

Signs. IQ2/IQ3 store the magnitudes in the grid and the signs apart. For a candidate ``c = s * g`` the signs
``s = sign(w)`` are taken; where the type stores 7 sign bits (an even count of negatives per 8 weights) and
``sign(w)`` has odd parity, every candidate also gets its cheapest single sign flip, evaluated exactly under
``M`` (for ``c_j -> -c_j``: ``dL = 4 S g_j (M_s (u - S g))_j + 4 S^2 g_j^2 M_jj`` with ``u = |w|`` and
``M_s = diag(s) M diag(s)``). IQ3_XXS shares one sign word between two 4-column codewords; the second
codeword then flips to the parity the first one left (``prior`` codes of the same 8 columns). IQ1's grid is
signed and shifted by ``delta = +-1/8``: IQ1_M picks delta per codeword, IQ1_S once per 32 columns (its first
codeword; the later ones keep it).

Scales (:meth:`CodebookSpec.fit`). When a solver reaches a 256-column block, every sub-block gets the
continuous ``S`` of smallest ``sum_c h_c (q_c - w_c)^2`` (``h = diag(H)``, each codeword the nearest under
that diagonal metric, signs by ``sign(w)``) over trial scales ``S = max|w| / (top * f)``, then a weighted
least-squares refit ``S = sum h |w| g / sum h g^2`` with those codewords; the format snaps the result to
its fp16 ``d`` and integer ``ls`` (:meth:`CodebookFormat.snap`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from turboboa.formats.registry import get_format
from turboboa.formats.spec import FormatSpec, grouped, reshape_grid
from turboboa.grids import BlockGrid

TRIAL_FACTORS = (0.6, 0.7, 0.8, 0.87, 0.93, 1.0, 1.07, 1.15, 1.25, 1.4)
FIT_CANDIDATES = 8  # codewords per vector kept for the trial scales (the nearest at S = max|w| / top)
FLIP_CANDIDATES = 16  # codewords per vector whose sign flips are priced (the best without a flip)
CHUNK_ELEMENTS = 1 << 24  # candidates x vectors evaluated at once


@functools.cache
def _tables(fmt_name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate unit values ``(K, v)``, their outer products ``(K, v*v)``, coordinate table ``(K, v)``).

    Sign types: the grid's magnitudes (signs are applied per row). IQ1: the signed grid shifted by
    ``-delta`` (first K) and ``+delta`` (next K)."""
    fmt = get_format(fmt_name)
    grid = torch.as_tensor(fmt.grid, dtype=torch.long, device=device)
    if fmt.sign_rule == "none":
        delta = float(fmt.levels[3])  # the +delta level of g = 0
        g = grid.to(torch.float32)
        cand = torch.cat([g - delta, g + delta])
        coords = torch.cat([grid, grid])
    else:
        mags = torch.tensor(fmt.magnitudes, dtype=torch.float32, device=device)
        cand = mags[grid]
        coords = grid
    outer = (cand.unsqueeze(-1) * cand.unsqueeze(-2)).reshape(cand.shape[0], -1)
    return cand, outer, coords


@dataclass(frozen=True)
class CodebookSpec(FormatSpec):
    """An i-quant codebook as a solver's grid: :meth:`fit` per 256-column block, :meth:`round_vector` per codeword."""

    @property
    def vector_width(self) -> int:
        """Columns one code covers: the codeword's ``dim``."""
        return self.fmt.dim

    @property
    def span(self) -> int:
        """Columns whose codes constrain each other: 8 for the even-sign types, IQ1's delta span, else ``dim``."""
        fmt = self.fmt
        if fmt.sign_rule == "even":
            return 8
        if fmt.sign_rule == "none":
            return fmt.delta_span
        return fmt.dim

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, w: torch.Tensor, H_block: torch.Tensor | None = None) -> BlockGrid:
        """Stored grid of ``w`` (``(B, R, W)``, whole 256-column blocks), weighted by ``diag(H_block)``."""
        fmt = self.fmt
        B, R, W = w.shape
        ng = W // fmt.group_size
        wg, h = grouped(w, H_block, fmt.group_size)  # (B, R, ng, G), (B|1, 1, ng, G)
        h = h.expand(B, R, ng, fmt.group_size)
        cand, _, _ = _tables(fmt.name, w.device)
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, ng * (fmt.group_size // fmt.dim) * cand.shape[0]))
        parts = [self._fit_scales(wg[:, r0 : r0 + rows_per_chunk], h[:, r0 : r0 + rows_per_chunk])
                 for r0 in range(0, R, rows_per_chunk)]
        scale = torch.cat(parts, dim=1)
        stored = fmt.snap(scale.reshape(B * R, ng))
        s, o = fmt.group_scale_offset(stored)
        return BlockGrid(s.reshape(B, R, ng), o.reshape(B, R, ng), reshape_grid(stored, B, R))

    def _fit_scales(self, wg: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Continuous sub-block scales of groups ``wg`` (``(B, R, ng, G)``) under weights ``h`` (same shape)."""
        fmt = self.fmt
        cand, _, _ = _tables(fmt.name, wg.device)
        v = fmt.dim
        B, R, ng, G = wg.shape
        x = wg.reshape(B, R, ng, G // v, v)
        hv = h.reshape(B, R, ng, G // v, v)
        if fmt.sign_rule != "none":
            x = x.abs()
        lin = (hv * x) @ cand.T  # (B, R, ng, G/v, K): sum h x c
        quad = hv @ (cand * cand).T  # sum h c^2
        top = float(cand.abs().max())
        amax = wg.abs().amax(-1)  # (B, R, ng)
        base = amax / top
        b = base[..., None, None]
        keep = (b * quad - 2 * lin).topk(min(FIT_CANDIDATES, cand.shape[0]), dim=-1, largest=False).indices
        lin, quad = lin.gather(-1, keep), quad.gather(-1, keep)
        best_s = base.clone()
        best_e = torch.full_like(base, float("inf"))

        def err_of(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sv = s[..., None, None]
            e, k = (sv * sv * quad - 2 * sv * lin).min(-1)
            return e.sum(-1), k

        best_k = None
        for f in TRIAL_FACTORS:
            s = base / f
            e, k = err_of(s)
            better = e < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
            best_k = k if best_k is None else torch.where(better[..., None], k, best_k)
        assert best_k is not None
        num = lin.gather(-1, best_k.unsqueeze(-1)).squeeze(-1).sum(-1)
        den = quad.gather(-1, best_k.unsqueeze(-1)).squeeze(-1).sum(-1)
        ls = torch.where(den > 0, num / den.clamp_min(1e-30), best_s).clamp_min(0)
        e, _ = err_of(ls)
        return torch.where(e < best_e, ls, best_s)

    # ------------------------------------------------------------------------------------------ round
    def round_vector(self, w: torch.Tensor, scale: torch.Tensor, metric: torch.Tensor,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (float, ``(N, v)``) of the best codeword for each row of ``w`` (``(N, v)``) at sub-block scale
        ``scale`` (``(N,)``) under ``metric`` (``(N|1, v, v)``); ``prior``: codes ``(N, p)`` already chosen
        in the same constraint span (IQ3_XXS's sign word, IQ1_S's delta), or None."""
        N = w.shape[0]
        cand, _, _ = _tables(self.fmt.name, w.device)
        per = max(1, CHUNK_ELEMENTS // (cand.shape[0] * self.vector_width))
        out = [self._round_chunk(w[n0 : n0 + per], scale[n0 : n0 + per],
                                 metric if metric.shape[0] == 1 else metric[n0 : n0 + per],
                                 None if prior is None else prior[n0 : n0 + per])
               for n0 in range(0, N, per)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def _round_chunk(self, w: torch.Tensor, S: torch.Tensor, M: torch.Tensor,
                     prior: torch.Tensor | None) -> torch.Tensor:
        fmt = self.fmt
        cand, outer, coords = _tables(fmt.name, w.device)
        w = w.to(torch.float32)
        M = M.to(torch.float32)
        S = S.to(torch.float32).unsqueeze(-1)
        N, v = w.shape
        K = cand.shape[0]
        Mw = (M @ w.unsqueeze(-1)).squeeze(-1)  # (N, v)
        if fmt.sign_rule == "none":
            loss = S * S * (M.reshape(-1, v * v) @ outer.T) - 2 * S * (Mw @ cand.T)
            if prior is not None and prior.shape[-1]:
                want_pos = (prior[:, :1] % 2) == 1  # the delta sign the span already holds
                pos = torch.arange(K, device=w.device) >= K // 2
                loss = loss.masked_fill(pos.unsqueeze(0) != want_pos, float("inf"))
            k = loss.argmin(-1)
            g = coords[k]
            delta_pos = (k >= K // 2).unsqueeze(-1).expand(N, v)
            return (2 * (g + 1) + delta_pos.long()).to(w.dtype)
        s = torch.where(w < 0, -1.0, 1.0)
        a = Mw * s  # M_s u with u = |w|
        Ms = M * s.unsqueeze(-1) * s.unsqueeze(-2)  # (N, v, v)
        loss = S * S * (Ms.reshape(N, v * v) @ outer.T) - 2 * S * (a @ cand.T)  # (N, K)
        flip = None
        done = 0 if prior is None else prior.shape[-1]
        if fmt.sign_rule == "even" and done + v == self.span:  # this codeword closes the sign word
            negatives = (s < 0).sum(-1)
            if done:
                negatives = negatives + (prior < len(fmt.magnitudes)).sum(-1)
            odd = (negatives % 2) == 1
            if bool(odd.any()):
                rows = odd.nonzero().squeeze(-1)
                flip = self._cheapest_flips(loss[rows], a[rows], Ms[rows], S[rows])
        k = loss.argmin(-1)
        if flip is not None:
            k_odd, j = flip
            k[rows] = k_odd
            s = s.clone()
            s[rows, j] = -s[rows, j]
        m = coords[k]
        n = len(fmt.magnitudes)
        return torch.where(s < 0, n - 1 - m, n + m).to(w.dtype)

    def _cheapest_flips(self, loss: torch.Tensor, a: torch.Tensor, Ms: torch.Tensor,
                        S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows whose signs have the wrong parity: the best codeword with its cheapest single flip
        (``(n,)`` codeword, ``(n,)`` flipped coordinate). ``loss``: ``(n, K)`` losses without a flip, ``a``:
        ``M_s u``, ``Ms``: ``M_s``, ``S``: ``(n, 1)``.

        The flips of the ``FLIP_CANDIDATES`` best codewords are priced first. A flip adds
        ``dL = 4 S g_j ((M_s (u - S g))_j + S g_j M_jj)``, which is never negative under a diagonal metric;
        there the best of the rest costs at least its unflipped loss, so rows whose flipped best is above the
        smallest unflipped loss left out are priced over every codeword (exact for diagonal metrics)."""
        cand, _, _ = _tables(self.fmt.name, loss.device)

        def price(idx: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = cand[idx]  # (n, T, v)
            Sr = S[rows].unsqueeze(-1)  # (n, 1, 1)
            MsG = g @ Ms[rows].transpose(-1, -2)  # (n, T, v): (M_s g)_j
            diag = torch.diagonal(Ms[rows], dim1=-2, dim2=-1).unsqueeze(1)
            dL = 4 * Sr * g * (a[rows].unsqueeze(1) - Sr * MsG + Sr * g * diag)
            cost, j = dL.min(-1)
            total = loss[rows].gather(-1, idx) + cost
            best = total.argmin(-1, keepdim=True)
            return idx.gather(-1, best).squeeze(-1), j.gather(-1, best).squeeze(-1), total.gather(-1, best)

        n, K = loss.shape
        T = min(FLIP_CANDIDATES, K)
        every = torch.arange(n, device=loss.device)
        if T == K:
            k, j, _ = price(torch.arange(K, device=loss.device).expand(n, K), every)
            return k, j
        vals, idx = loss.topk(T + 1, dim=-1, largest=False)
        k, j, total = price(idx[:, :T], every)
        unsure = (total.squeeze(-1) > vals[:, T]).nonzero().squeeze(-1)
        if unsure.numel():
            k2, j2, _ = price(torch.arange(K, device=loss.device).expand(unsure.numel(), K), unsure)
            k[unsure], j[unsure] = k2, j2
        return k, j

    def nearest(self, W: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                H: torch.Tensor | None = None) -> torch.Tensor:
        """RTN's codes for ``W`` (``(B, R, C)``, per-column ``scale``): every codeword under the diagonal block
        ``H_JJ`` of its columns (identity without ``H``), no compensation between codewords."""
        B, R, C = W.shape
        v, span = self.vector_width, self.span
        steps = span // v
        codes = torch.zeros_like(W)
        for c0 in range(0, C, span):
            for p in range(steps):
                j = c0 + p * v
                J = slice(j, j + v)
                if H is None:
                    M = torch.eye(v, dtype=torch.float32, device=W.device).unsqueeze(0)
                else:
                    M = H[:, J, J].to(torch.float32).expand(B, v, v).repeat_interleave(R, 0)
                prior = codes[..., c0:j].reshape(B * R, j - c0)
                codes[..., J] = self.round_vector(W[..., J].reshape(B * R, v), scale[..., j].reshape(B * R),
                                                  M, prior).reshape(B, R, v)
        return codes

    def value(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``fp32(S * level[code])`` (no offset; exact, the product ggml computes)."""
        return scale.to(torch.float32) * self.fmt.levels_on(codes.device)[codes.long()]
