"""Streaming agreement metrics of a backend's logits with the fake-quant model's, one window at a time.

For a window of ``L`` tokens every position ``t = 0..L-2`` predicts token ``t + 1``. With the reference
(fake-quant) log-probabilities ``log p_t`` and the backend's ``log q_t`` (log-softmax in float32):

* NLL: ``-sum_t log q_t(x_{t+1})`` (summed in float64), so ``PPL = exp(NLL / tokens)`` exactly as
  :func:`turboboa.eval.perplexity.perplexity` computes it;
* KL divergence of the backend from the reference: ``KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))``
  (terms with ``p_t(v) = 0`` count 0; a position's sum, >= 0 in exact arithmetic, is clamped at 0 against
  float32 rounding), averaged over every predicted position;
* top-1 agreement: the share of positions where ``argmax_v q_t(v) == argmax_v p_t(v)``.

Only the sums live between windows, so each window's logits can be dropped right after :meth:`update`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reference:
    """What every backend's window is compared with: the fake-quant model's log-probabilities ``(L-1, V)``,
    their probabilities, and its top-1 tokens ``(L-1,)``."""

    logp: torch.Tensor
    prob: torch.Tensor
    top1: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> Reference:
        """The reference of one window's logits ``(L, V)`` (the last position predicts nothing)."""
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        return cls(logp=logp, prob=logp.exp(), top1=logp.argmax(dim=-1))


@dataclass
class StreamMetrics:
    """Running sums for one backend: NLL, KL(p_ref || p_backend), top-1 agreements, tokens, seconds."""

    nll_sum: float = 0.0
    kl_sum: float = 0.0
    agree: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def update(self, logits: torch.Tensor, window: torch.Tensor, ref: Reference) -> None:
        """Add one window: ``logits`` ``(L, V)`` of the backend for the token ids ``window`` ``(L,)``."""
        if logits.shape[-1] != ref.logp.shape[-1]:
            raise ValueError(f"vocabulary of {logits.shape[-1]} logits, the reference has {ref.logp.shape[-1]}")
        logq = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = window[1:].to(logq.device).long()
        self.nll_sum -= float(logq.gather(-1, targets[:, None]).double().sum())
        terms = torch.where(ref.prob > 0, ref.prob * (ref.logp - logq), 0.0)  # 0 log 0 = 0
        # each position's KL is >= 0; float32 rounding of two near-equal distributions can dip below it
        self.kl_sum += float(terms.sum(dim=-1).clamp_min(0).double().sum())
        self.agree += int((logq.argmax(dim=-1) == ref.top1).sum())
        self.tokens += int(targets.numel())

    @property
    def ppl(self) -> float:
        """``exp(mean NLL)`` over the predicted tokens."""
        return math.exp(self.nll_sum / self.tokens)

    @property
    def kl(self) -> float:
        """Mean KL(p_ref || p_backend) per predicted token, in nats."""
        return self.kl_sum / self.tokens

    @property
    def top1(self) -> float:
        """Share of predicted positions whose most likely token is the reference's."""
        return self.agree / self.tokens
