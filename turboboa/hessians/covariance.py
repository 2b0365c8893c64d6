"""Running-mean second-moment statistics in float32 (GPTQ Hessian and the F2 cross term)."""

from __future__ import annotations

import torch
from torch import Tensor

from turboboa.errors import UserError


class RunningMean:
    """Mean of per-sample statistics, updated from batch sums.

    After batches with sums S_1..S_k over m_1..m_k samples, ``value = (sum_i S_i) / (sum_i m_i)``, computed as
    m <- m * n / (n + m_k) + S_k / (n + m_k) so that the scale never depends on the number of samples.
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.n: int = 0

    def update(self, total: Tensor, count: int) -> None:
        """Fold in the sum ``total`` of ``count`` new samples' statistics (cast to float32)."""
        if count <= 0:
            return
        total = total.to(torch.float32)
        new_n = self.n + count
        if self.value is None:
            self.value = total / count
        else:
            if total.shape != self.value.shape:
                raise UserError(
                    f"statistic shape changed from {tuple(self.value.shape)} to {tuple(total.shape)}; "
                    "use one accumulator per layer and keep the model shape fixed"
                )
            self.value.mul_(self.n / new_n).add_(total.to(self.value.device), alpha=1.0 / new_n)
        self.n = new_n


def _tokens(x: Tensor) -> Tensor:
    """Flatten (..., d) to float32 (N, d): one row per token."""
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


class CovarianceAccumulator:
    """GPTQ statistics of one linear layer's input x (d_in), as running means over tokens in float32.

    ``H = 2 * mean_t x_t x_t^T`` (from ``add``) and the F2 cross term ``C = 2 * mean_t (x_fp,t - x_t) x_t^T``
    (from ``add_cross``; it updates only C, so call ``add(x)`` too for H). ``n`` counts the tokens in H.
    """

    def __init__(self) -> None:
        self._h = RunningMean()
        self._c = RunningMean()

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
