"""Hessian statistics for quantization: plain GPTQ covariances and attention-aware (BoA) statistics."""

from turboboa.hessians.attention import AttentionStatistics, rope_average
from turboboa.hessians.covariance import CovarianceAccumulator, RunningMean

__all__ = ["AttentionStatistics", "CovarianceAccumulator", "RunningMean", "rope_average"]
