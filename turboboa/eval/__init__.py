"""Evaluation: perplexity over consecutive token windows, for any backend that returns logits."""

from turboboa.eval.perplexity import PerplexityResult, make_windows, perplexity, torch_logits_fn

__all__ = ["PerplexityResult", "make_windows", "perplexity", "torch_logits_fn"]
