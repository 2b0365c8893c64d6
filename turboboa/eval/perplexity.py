"""Perplexity over consecutive non-overlapping token windows, independent of the inference backend.

Protocol: the evaluation text is tokenized once and cut into consecutive windows of ``seqlen`` tokens
(the incomplete tail dropped, optionally only the first K windows). Each window is scored independently;
every token after the first of a window is predicted, and PPL = exp(mean NLL over all predicted tokens).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from turboboa.errors import UserError

LogitsFn = Callable[[torch.Tensor], Any]


@dataclass
class PerplexityResult:
    """Perplexity of a model on a set of windows, with the mean NLL and the counts behind it."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    backend: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (e.g. tokenizer mismatch)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-serializable dict (``extra``'s keys at the top level)."""
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def make_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Return the consecutive non-overlapping windows of ``seqlen`` tokens, a LongTensor (K, seqlen).

    The incomplete tail is dropped; with ``max_windows`` only the first ``max_windows`` windows are kept.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 to predict a token, not {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, not {max_windows}")
    count = tokens.numel() // seqlen
    if count == 0:
        raise UserError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of --seqlen "
                        f"{seqlen}; use a smaller --seqlen or a longer text")
    if max_windows is not None:
        count = min(count, max_windows)
    return tokens[: count * seqlen].reshape(count, seqlen).long()


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Return the summed NLL (float64) of tokens 2..L of ``window`` (L,) given ``logits`` (L, V)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = window[1:].to(logp.device).long()
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return -float(picked.double().sum())


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, backend: str, progress: bool = True) -> PerplexityResult:
    """Return the perplexity of ``logits_fn`` on ``windows`` (K, L), each window scored independently.

    ``logits_fn`` maps input ids (1, L) to logits (1, L, V) (a torch tensor or anything ``torch.as_tensor``
    accepts). Log-softmax runs in float32 and NLLs are summed in float64; a tqdm bar with ETA goes to stderr.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (K>=1, L>=2), got {tuple(windows.shape)}")
    count, seqlen = windows.shape
    total = 0.0
    start = time.perf_counter()
    bar = tqdm(total=count, desc=f"ppl [{backend}]", unit="win", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for i in range(count):
            window = windows[i]
            logits = torch.as_tensor(logits_fn(window[None]))
            if logits.dim() != 3 or logits.shape[0] != 1 or logits.shape[1] != seqlen:
                raise ValueError(f"backend {backend!r} returned logits of shape {tuple(logits.shape)}, "
                                 f"expected (1, {seqlen}, vocab)")
            total += window_nll(logits[0], window)
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(total / ((i + 1) * (seqlen - 1))):.3f}")
    finally:
        bar.close()
    predicted = count * (seqlen - 1)
    nll = total / predicted
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=predicted, windows=count, seqlen=seqlen,
                            backend=backend, seconds=time.perf_counter() - start)


def torch_logits_fn(model: torch.nn.Module, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a logits_fn running ``model(input_ids=...).logits`` on ``device`` under ``torch.inference_mode``."""
    device = torch.device(device)

    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        """Return the model's logits (1, L, V) for ``input_ids`` (1, L)."""
        with torch.inference_mode():
            return model(input_ids=input_ids.to(device)).logits

    return logits_fn
