"""Second-moment statistics in float32 (GPTQ Hessian and the F2 cross term), folded shard by shard in order."""

from __future__ import annotations

import torch
from torch import Tensor

from turboboa.errors import UserError


class RunningMean:
    """Mean of per-sample statistics, updated from batch sums in the order they come.

    After batches with sums S_1..S_k over m_1..m_k samples, ``value = (sum_i S_i) / (sum_i m_i)``, computed as
    ``mu_1 = S_1 / m_1`` and ``mu <- mu * n / (n + m_k) + S_k / (n + m_k)`` so that the scale never depends on the
    number of samples. The block loop gives each calibration shard (one batch) its own RunningMean and folds
    the shards in shard order with :meth:`merge`, which replays the shard's batch as an ``update``: one process
    and several ranks (:mod:`turboboa.distributed`) make the same sequence of updates, so the same bytes.
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None  # S_1 while one batch is held (what merge replays)
        self._mean: Tensor | None = None  # mu once a second batch came
        self.n: int = 0

    def update(self, total: Tensor, count: int) -> None:
        """Fold in the sum ``total`` of ``count`` new samples' statistics (cast to float32)."""
        if count <= 0:
            return
        total = total.to(torch.float32)
        if self.n == 0:
            self._sum = total
            self.n = count
            return
        held = self._sum if self._mean is None else self._mean
        if total.shape != held.shape:
            raise UserError(
                f"statistic shape changed from {tuple(held.shape)} to {tuple(total.shape)}; "
                "use one accumulator per layer and keep the model shape fixed"
            )
        if self._mean is None:
            self._mean, self._sum = self._sum / self.n, None
        new_n = self.n + count
        self._mean.mul_(self.n / new_n).add_(total.to(self._mean.device), alpha=1.0 / new_n)
        self.n = new_n

    def merge(self, other: RunningMean) -> None:
        """Fold in ``other``, a shard's accumulator of one batch, as that batch's ``update`` here."""
        if other.n == 0:
            return
        if other._sum is None:
            raise ValueError("merge replays one batch; this accumulator folded several (one per shard is needed)")
        self.update(other._sum, other.n)

    def take(self, scale: float = 1.0) -> Tensor | None:
        """``scale * value``, computed in the memory this accumulator holds, which it then gives up (it is empty
        afterwards): the same numbers as ``scale * value`` without a second copy."""
        if self._mean is not None:
            t = self._mean
        elif self._sum is not None:
            t = self._sum.div_(self.n)
        else:
            return None
        self._sum, self._mean, self.n = None, None, 0
        return t.mul_(scale)

    @property
    def value(self) -> Tensor | None:
        """The mean (None before any sample)."""
        if self._mean is not None:
            return self._mean
        return None if self._sum is None else self._sum / self.n


def _tokens(x: Tensor) -> Tensor:
    """Flatten (..., d) to float32 (N, d): one row per token."""
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


def _weighted(tokens: Tensor, weight: Tensor | None) -> Tensor:
    """``tokens`` (N, d) with row t times ``weight[t]`` (``weight`` any shape of N elements), or unchanged."""
    if weight is None:
        return tokens
    return tokens * weight.reshape(-1, 1).to(device=tokens.device, dtype=torch.float32)


class CovarianceAccumulator:
    """GPTQ statistics of one linear layer's input x (d_in), as means over tokens in float32 (:class:`RunningMean`).

    ``H = 2 * mean_t x_t x_t^T`` (from ``add``) and the F2 cross term ``C = 2 * mean_t (x_fp,t - x_t) x_t^T``
    (from ``add_cross``; it updates only C, so call ``add(x)`` too for H); with per-token weights ``w_t``,
    ``H = 2 * mean_t w_t x_t x_t^T`` and ``C = 2 * mean_t w_t (x_fp,t - x_t) x_t^T``. ``n`` counts the tokens in H.
    """

    def __init__(self) -> None:
        self._h = RunningMean()
        self._c = RunningMean()

    def merge(self, other: CovarianceAccumulator) -> None:
        """Fold in ``other``'s sums of H and C after this one's (:meth:`RunningMean.merge`)."""
        self._h.merge(other._h)
        self._c.merge(other._c)

    def add(self, x: Tensor, weight: Tensor | None = None) -> None:
        """Accumulate H from inputs x (..., d_in): sum_t x_t x_t^T over the flattened tokens, each token's term
        times ``weight[t]`` when given (one weight per token)."""
        tokens = _tokens(x)
        self._h.update(tokens.T @ _weighted(tokens, weight), tokens.shape[0])

    def add_cross(self, x_fp: Tensor, x: Tensor, weight: Tensor | None = None) -> None:
        """Accumulate C from the full-precision and quantized streams (same tokens): sum_t (x_fp,t - x_t) x_t^T,
        each token's term times ``weight[t]`` when given."""
        if x_fp.shape != x.shape:
            raise UserError(
                f"full-precision input {tuple(x_fp.shape)} and quantized input {tuple(x.shape)} differ in shape; "
                "feed both streams the same calibration tokens"
            )
        tokens = _tokens(x)
        delta = _tokens(x_fp).to(tokens.device) - tokens
        self._c.update(delta.T @ _weighted(tokens, weight), tokens.shape[0])

    @property
    def n(self) -> int:
        """Number of tokens accumulated into H."""
        return self._h.n

    @property
    def n_cross(self) -> int:
        """Number of tokens accumulated into C."""
        return self._c.n

    @property
    def H(self) -> Tensor:
        """H = 2 * mean_t x_t x_t^T, float32 (d_in, d_in)."""
        if self._h.value is None:
            raise RuntimeError("CovarianceAccumulator.H read before any add(x)")
        return 2.0 * self._h.value

    def take(self) -> tuple[Tensor, Tensor | None]:
        """``(H, C)`` as :attr:`H` and :attr:`C` give them, computed in this accumulator's own memory, which it
        then gives up: for the one layer it serves, so that no second ``d_in x d_in`` copy is made."""
        if self._h.n == 0:
            raise RuntimeError("CovarianceAccumulator.take before any add(x)")
        H = self._h.take(2.0)
        assert H is not None
        return H, self._c.take(2.0)

    @property
    def C(self) -> Tensor | None:
        """C = 2 * mean_t (x_fp,t - x_t) x_t^T, float32 (d_in, d_in); None if add_cross was never called."""
        return None if self._c.value is None else 2.0 * self._c.value
