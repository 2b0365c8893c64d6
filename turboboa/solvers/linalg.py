"""Damping and the Cholesky factor of the inverse Hessian, shared by every solver (float32 throughout)."""

from __future__ import annotations

import torch


def as_float(t: torch.Tensor) -> torch.Tensor:
    """float32, except that float64 (used by exact tests) is kept."""
    return t if t.dtype == torch.float64 else t.float()


class HessianError(RuntimeError):
    """A Hessian that stays singular after all damping retries, or holds NaN/Inf."""


def damp(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(H + lambda I, dead)`` where ``lambda = percdamp * mean(diag H)`` per matrix.

    Dead inputs (``H_ii = 0``: the column never sees a non-zero activation) get ``H_ii = 1`` so the matrix is
    invertible; their weights do not affect the objective and are set to zero by the caller.
    Works on ``(C, C)`` or batched ``(B, C, C)`` matrices; returns a new tensor.
    """
    H = as_float(H).clone()
    if not torch.isfinite(H).all():
        raise HessianError("Hessian holds NaN or Inf")
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    lam = percdamp * diag.mean(dim=-1, keepdim=True)
    diag += lam
    return H, dead


def cholesky_inverse_upper(H: torch.Tensor, percdamp: float = 0.01, retries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``U = chol(H_damped^-1)^T`` (upper triangular, ``H_damped^-1 = U^T U``) and the damped ``H`` used.

    Damping starts at ``percdamp`` of the mean diagonal and grows tenfold on each failed Cholesky.
    """
    for attempt in range(retries):
        # a failed factorization retries with tenfold damping (starting from 1e-4 when none was asked for)
        lam = percdamp * 10**attempt if percdamp > 0 else (0.0 if attempt == 0 else 1e-4 * 10 ** (attempt - 1))
        Hd, _ = damp(H, lam)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info.max()) == 0:
            # cholesky_solve(I) rather than cholesky_inverse: the latter is ~50x slower on some CPU builds
            eye = torch.eye(Hd.shape[-1], dtype=Hd.dtype, device=Hd.device).expand_as(Hd)
            Hinv = torch.cholesky_solve(eye, L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info.max()) == 0 and torch.isfinite(U).all():
                return U, Hd
    raise HessianError(f"Cholesky failed even with damping {percdamp * 10 ** (retries - 1):g}")


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Boolean mask of inputs whose Hessian diagonal is exactly 0."""
    return torch.diagonal(H, dim1=-2, dim2=-1) == 0
