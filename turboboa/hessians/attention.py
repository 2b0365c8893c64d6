"""Attention-aware Hessian statistics (BoA) and the TurboBoA F2 cross term for the value projection.

Notation per block: X the attention input (tokens x D), head dim d, H query heads, G KV heads, r = H / G;
query head h reads KV head g(h) = h // r. All statistics are float32 running means over calibration tokens.
RoPE follows the HF "rotate_half" convention: R_t = diag(c_t) + diag(s_t) J with J = [[0, -I], [I, 0]]; a
family without RoPE has R_t = I, so its row Hessians are the plain key and query covariances. Layers are
named by role: q, k, v the query, key and value projections.

Per-head q/k norms (Qwen3, Gemma 3): the attention reads ``q^_t = diag(gamma_q) q_t / rho_t`` with
``q_t = W_q x_t`` (one head) and ``rho_t = sqrt(mean(q_t^2) + eps)``, then ``q~_t = R_t q^_t``; ``gamma_q`` is
the norm's effective gain (``w``, Gemma's ``1 + w``), recorded by the adapter as ``q_gain`` (``k_gain``). Freezing
each token's ``rho_t``, a change ``dq_t = dW x_t`` moves the score by
``ds_{t,s} = (R_t diag(gamma_q) dq_t / rho_t) . k~_s``, so the relaxed error's Hessian is
``sum_t (x_t x_t^T / rho_t^2) (x) diag(gamma_q) R_t^T Mk R_t diag(gamma_q)``. The ``1 / rho_t^2`` go into the
column Hessian, ``H_col = 2 mean_t w_t x_t x_t^T`` with ``w_t = mean_h 1 / rho_{h,t}^2`` (one column Hessian
for the layer: the heads' weights averaged; the block loop's norm-weighted covariances), and
``H_row(q, h) = diag(gamma_q) RoPEavg(Mk_g) diag(gamma_q)`` with ``Mk`` of the normalized keys ``k~``, and
likewise ``H_row(k, g) = diag(gamma_k) RoPEavg(mean_{h in g} Mq_h) diag(gamma_k)``.

A family whose layers use different RoPE tables (Gemma 3: local and global bases) records the block's own
tables as ``rope_cos`` / ``rope_sin`` (L, d); ``RoPEavg`` then averages over those instead of the tables passed
to :meth:`AttentionStatistics.row_hessian_q`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from turboboa.errors import UserError
from turboboa.hessians.covariance import CovarianceAccumulator, RunningMean

_REQUIRED = ("attn_input", "q_rope", "k_rope", "attn_probs")
_GAINS = ("q_gain", "k_gain")  # optional: the per-head q/k norms' gains (d,), where the family has them
_TABLES = ("rope_cos", "rope_sin")  # optional: the block's own RoPE tables (L, d)


def _right_j(m: Tensor) -> Tensor:
    """M J for J = [[0, -I], [I, 0]]: with column blocks M = [M1, M2], M J = [M2, -M1]."""
    m1, m2 = m.chunk(2, dim=-1)
    return torch.cat((m2, -m1), dim=-1)


def _left_jt(m: Tensor) -> Tensor:
    """J^T M for J = [[0, -I], [I, 0]]: with row blocks M = [M1; M2], J^T M = [M2; -M1]."""
    m1, m2 = m.chunk(2, dim=-2)
    return torch.cat((m2, -m1), dim=-2)


def rope_average(m: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE-averaged matrix (1/L) sum_t R_t^T M R_t in closed form, M (..., d, d), cos/sin (L, d).

    With R_t = C_t + S_t J (C_t = diag(c_t), S_t = diag(s_t)) and D M D' = M o (diag(D) diag(D')^T):
    mean_t R_t^T M R_t = M o Ecc + (M o Ecs) J + J^T (M o Ecs^T) + J^T (M o Ess) J,
    where Ecc = mean_t c_t c_t^T, Ecs = mean_t c_t s_t^T, Ess = mean_t s_t s_t^T.
    """
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[-1] != m.shape[-1] or m.shape[-1] % 2:
        raise UserError(
            f"rope_average needs cos/sin of shape (L, d) matching M (..., d, d) with even d; got cos "
            f"{tuple(cos.shape)}, sin {tuple(sin.shape)}, M {tuple(m.shape)}; pass rotary_cos_sin(model, L)"
        )
    m = m.to(torch.float32)
    c = cos.to(device=m.device, dtype=torch.float32)
    s = sin.to(device=m.device, dtype=torch.float32)
    n = c.shape[0]
    ecc, ecs, ess = (c.T @ c) / n, (c.T @ s) / n, (s.T @ s) / n
    return m * ecc + _right_j(m * ecs) + _left_jt(m * ecs.T) + _left_jt(_right_j(m * ess))


class AttentionStatistics:
    """Accumulates the attention-aware statistics of one block from ``block_forward`` records.

    Per call to ``add`` (tokens n = B L of the quantized stream):
      Mk_g = mean_t k~_t k~_t^T (G, d, d), Mq_h = mean_t q~_t q~_t^T (H, d, d),
      V_g = mean_t sum_{h in g} y_{h,t} y_{h,t}^T with Y_h = A_h X (G, D, D),
      F_g = mean_t sum_{h in g} (y_fp,h,t - y_h,t) y_h,t^T with Y_fp,h = A_fp,h X_fp (only with ``rec_fp``),
    and the plain q/k/v GPTQ statistics in ``self.qkv`` (H = 2 mean x x^T, C = 2 mean (x_fp - x) x^T).
    ``max_chunk_bytes`` bounds the float32 temporaries of the (L x L) and (L x D) per-group products.
    """

    def __init__(self, max_chunk_bytes: int = 1 << 28) -> None:
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.qkv = CovarianceAccumulator()
        self._kk = RunningMean()
        self._qq = RunningMean()
        self._vv = RunningMean()
        self._cross = RunningMean()
        self.n_heads: int | None = None
        self.n_kv_heads: int | None = None
        self.gains: dict[str, Tensor] = {}
        self.tables: tuple[Tensor, Tensor] | None = None

    @property
    def n(self) -> int:
        """Number of quantized-stream tokens accumulated."""
        return self._kk.n

    @property
    def group_size(self) -> int:
        """r = H / G, query heads per KV head."""
        if self.n_heads is None or self.n_kv_heads is None:
            raise RuntimeError("AttentionStatistics read before any add()")
        return self.n_heads // self.n_kv_heads

    def merge(self, other: AttentionStatistics) -> None:
        """Fold in ``other``'s sums after this one's (another shard of the same block's calibration set); the
        block's recorded q/k gains and RoPE tables, the same in every shard, come along."""
        if other.n_heads is not None:
            self.n_heads, self.n_kv_heads = other.n_heads, other.n_kv_heads
        self.gains.update(other.gains)
        if other.tables is not None:
            self.tables = other.tables
        self.qkv.merge(other.qkv)
        for mine, theirs in ((self._kk, other._kk), (self._qq, other._qq), (self._vv, other._vv),
                             (self._cross, other._cross)):
            mine.merge(theirs)

    def _check(self, rec: dict[str, Tensor], which: str) -> tuple[Tensor, Tensor]:
        """Validate a record dict and return (X float32 (B, L, D), A float32 (B, H, L, L))."""
        missing = [key for key in _REQUIRED if key not in rec]
        if missing:
            raise UserError(
                f"{which} record lacks {missing}; fill it with block_forward(..., record=rec.__setitem__)"
            )
        x, a, q, k = rec["attn_input"], rec["attn_probs"], rec["q_rope"], rec["k_rope"]
        batch, seqlen, _ = x.shape
        n_heads, n_kv = q.shape[1], k.shape[1]
        ok = (
            a.shape == (batch, n_heads, seqlen, seqlen)
            and q.shape[0] == k.shape[0] == batch
            and q.shape[2] == k.shape[2] == seqlen
            and n_heads % n_kv == 0
        )
        if not ok:
            raise UserError(
                f"{which} record shapes disagree (attn_input {tuple(x.shape)}, q_rope {tuple(q.shape)}, "
                f"k_rope {tuple(k.shape)}, attn_probs {tuple(a.shape)}); record them from one block_forward call"
            )
        if self.n_heads is None:
            self.n_heads, self.n_kv_heads = n_heads, n_kv
        elif (self.n_heads, self.n_kv_heads) != (n_heads, n_kv):
            raise UserError(
                f"{which} record has {n_heads}/{n_kv} query/KV heads but earlier ones had "
                f"{self.n_heads}/{self.n_kv_heads}; use one AttentionStatistics per block"
            )
        return x.to(torch.float32), a.to(torch.float32)

    def _group_chunk(self, batch: int, seqlen: int, hidden: int) -> int:
        """KV groups per chunk so that the temporaries Y = A X (B r L D floats per group, twice) fit the budget."""
        per_group = 4 * batch * self.group_size * seqlen * 2 * hidden
        return max(1, self.max_chunk_bytes // max(per_group, 1))

    def _grouped(self, a: Tensor) -> Tensor:
        """(B, H, L, L) -> (B, G, r, L, L): query heads of KV group g along dim 2."""
        batch, _, seqlen, _ = a.shape
        return a.view(batch, self.n_kv_heads, self.group_size, seqlen, seqlen)

    def _weighted_inputs(self, a: Tensor, x: Tensor) -> Tensor:
        """Y_h = A_h X for the query heads of a chunk of groups: (B, g, r, L, D). Cost L^2 D per head."""
        return torch.matmul(a, x[:, None, None])

    def _value_stats(self, a: Tensor, x: Tensor, a_fp: Tensor | None = None,
                     x_fp: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Per KV group g: sum_b sum_{h in g} Y_h^T Y_h with Y_h = A_h X, and (with the fp stream)
        sum_b sum_{h in g} (Y_fp,h - Y_h)^T Y_h with Y_fp,h = A_fp,h X_fp; both (G, D, D).

        Y_h is formed once per head and serves both sums; cost L^2 D + L D^2 per head and stream.
        """
        batch, seqlen, hidden = x.shape
        a = self._grouped(a)
        a_fp = None if a_fp is None else self._grouped(a_fp)
        step = self._group_chunk(batch, seqlen, hidden)
        grams, crosses = [], []
        for g0 in range(0, a.shape[1], step):
            y = self._weighted_inputs(a[:, g0 : g0 + step], x)
            grams.append(torch.einsum("bgrld,bgrle->gde", y, y))
            if a_fp is not None:
                y_fp = self._weighted_inputs(a_fp[:, g0 : g0 + step], x_fp)
                crosses.append(torch.einsum("bgrld,bgrle->gde", y_fp - y, y))
        return torch.cat(grams, dim=0), (torch.cat(crosses, dim=0) if crosses else None)

    def add(self, rec: dict[str, Tensor], rec_fp: dict[str, Tensor] | None = None) -> None:
        """Accumulate one batch: ``rec`` from the quantized stream, ``rec_fp`` (same tokens) from the fp stream."""
        x, a = self._check(rec, "quantized-stream")
        q = rec["q_rope"].to(torch.float32)
        k = rec["k_rope"].to(torch.float32)
        n = x.shape[0] * x.shape[1]
        self._qq.update(torch.einsum("bhld,bhle->hde", q, q), n)
        self._kk.update(torch.einsum("bgld,bgle->gde", k, k), n)
        self.qkv.add(x)
        for key in _GAINS:
            if key in rec:
                self.gains[key] = rec[key].detach().to(device=q.device, dtype=torch.float32).reshape(-1)
        if all(key in rec for key in _TABLES):
            self.tables = (rec["rope_cos"].detach(), rec["rope_sin"].detach())
        x_fp = a_fp = None
        if rec_fp is not None:
            x_fp, a_fp = self._check(rec_fp, "full-precision")
            if x_fp.shape != x.shape:
                raise UserError(
                    f"full-precision attn_input {tuple(x_fp.shape)} differs from quantized {tuple(x.shape)}; "
                    "run both streams on the same calibration tokens"
                )
            x_fp, a_fp = x_fp.to(x.device), a_fp.to(x.device)
            self.qkv.add_cross(x_fp, x)
        gram, cross = self._value_stats(a, x, a_fp, x_fp)
        self._vv.update(gram, n)
        if cross is not None:
            self._cross.update(cross, n)

    def _require(self, stat: RunningMean) -> Tensor:
        """The accumulated mean, or an error if nothing was added."""
        if stat.value is None:
            raise RuntimeError("AttentionStatistics read before any add()")
        return stat.value

    def _gained(self, m: Tensor, key: str) -> Tensor:
        """``diag(gamma) M diag(gamma)`` with the recorded gain ``key`` (module docstring); M without one."""
        gain = self.gains.get(key)
        return m if gain is None else m * gain.to(m.device)[:, None] * gain.to(m.device)[None, :]

    def _rope_average(self, m: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        """RoPEavg(M) over the block's recorded tables, else over ``cos``/``sin``; M itself without RoPE."""
        if self.tables is not None:
            cos, sin = self.tables
        return m if cos is None else rope_average(m, cos, sin)

    def row_hessian_q(self, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        """H_row(q, h) = (1/L) sum_t R_t^T Mk_{g(h)} R_t, (H, d, d); cos/sin (L, d) for the calibration L, or
        None without RoPE (R_t = I: H_row(q, h) = Mk_{g(h)}); with a q norm ``diag(gamma_q) . diag(gamma_q)``."""
        mk = self._require(self._kk)
        averaged = self._gained(self._rope_average(mk, cos, sin), "q_gain")
        return averaged.repeat_interleave(self.group_size, dim=0)

    def row_hessian_k(self, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        """H_row(k, g) = (1/L) sum_t R_t^T (mean_{h in g} Mq_h) R_t, (G, d, d); the mean alone without RoPE;
        with a k norm ``diag(gamma_k) . diag(gamma_k)``."""
        mq = self._require(self._qq)
        mq = mq.view(self.n_kv_heads, self.group_size, *mq.shape[1:]).mean(dim=1)
        return self._gained(self._rope_average(mq, cos, sin), "k_gain")

    def col_hessian_v(self) -> Tensor:
        """H_col(v, g) = mean_{h in g} 2 mean_t y_h y_h^T with Y_h = A_h X, (G, D, D)."""
        return self._require(self._vv) * (2.0 / self.group_size)

    def cross_v(self) -> Tensor | None:
        """C_v(g) = mean_{h in g} 2 mean_t (y_fp,h - y_h) y_h^T, (G, D, D); None without fp-stream records."""
        if self._cross.value is None:
            return None
        return self._cross.value * (2.0 / self.group_size)
