"""Second-moment statistics in float32 (GPTQ Hessian and the F2 cross term), as ordered sums over shards."""

from __future__ import annotations

import torch
from torch import Tensor

from turboboa.errors import UserError


class RunningMean:
    """Mean of per-sample statistics, as an ordered sum of batch sums divided once by the count.

    After batches with sums S_1..S_k over m_1..m_k samples, ``value = (((S_1 + S_2) + S_3) + ... + S_k) /
    (m_1 + ... + m_k)``: the sums are folded left in the order they come (``update``, or ``merge`` of another
    RunningMean's fold), in float32. The block loop gives each calibration shard its own RunningMean and merges
    the shards in shard order (:mod:`turboboa.distributed`), so one process and several ranks hold the same bytes.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.n: int = 0

    def update(self, total: Tensor, count: int) -> None:
        """Fold in the sum ``total`` of ``count`` new samples' statistics (cast to float32)."""
        if count <= 0:
            return
        total = total.to(torch.float32)
        if self.total is None:
            self.total = total.clone()
        else:
            if total.shape != self.total.shape:
                raise UserError(
                    f"statistic shape changed from {tuple(self.total.shape)} to {tuple(total.shape)}; "
                    "use one accumulator per layer and keep the model shape fixed"
                )
            self.total.add_(total.to(self.total.device))
        self.n += count

    def merge(self, other: RunningMean) -> None:
        """Fold in ``other``'s sum (after this one's): as if its batches had been ``update``d here, when it
        holds one batch."""
        if other.total is not None:
            self.update(other.total, other.n)

    @property
    def value(self) -> Tensor | None:
        """The mean: the folded sum divided by the count (None before any sample)."""
        return None if self.total is None else self.total / self.n


def _tokens(x: Tensor) -> Tensor:
    """Flatten (..., d) to float32 (N, d): one row per token."""
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


class CovarianceAccumulator:
    """GPTQ statistics of one linear layer's input x (d_in), as means over tokens in float32 (:class:`RunningMean`).

    ``H = 2 * mean_t x_t x_t^T`` (from ``add``) and the F2 cross term ``C = 2 * mean_t (x_fp,t - x_t) x_t^T``
    (from ``add_cross``; it updates only C, so call ``add(x)`` too for H). ``n`` counts the tokens in H.
    """

    def __init__(self) -> None:
        self._h = RunningMean()
        self._c = RunningMean()

    def merge(self, other: CovarianceAccumulator) -> None:
        """Fold in ``other``'s sums of H and C after this one's (:meth:`RunningMean.merge`)."""
        self._h.merge(other._h)
        self._c.merge(other._c)

    def add(self, x: Tensor) -> None:
        """Accumulate H from inputs x (..., d_in): sum_t x_t x_t^T over the flattened tokens."""
        tokens = _tokens(x)
        self._h.update(tokens.T @ tokens, tokens.shape[0])

    def add_cross(self, x_fp: Tensor, x: Tensor) -> None:
        """Accumulate C from the full-precision and quantized streams (same tokens): sum_t (x_fp,t - x_t) x_t^T."""
        if x_fp.shape != x.shape:
            raise UserError(
                f"full-precision input {tuple(x_fp.shape)} and quantized input {tuple(x.shape)} differ in shape; "
                "feed both streams the same calibration tokens"
            )
        tokens = _tokens(x)
        delta = _tokens(x_fp).to(tokens.device) - tokens
        self._c.update(delta.T @ tokens, tokens.shape[0])

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

    @property
    def C(self) -> Tensor | None:
        """C = 2 * mean_t (x_fp,t - x_t) x_t^T, float32 (d_in, d_in); None if add_cross was never called."""
        return None if self._c.value is None else 2.0 * self._c.value
