"""Damping and the Cholesky factor of the inverse Hessian, shared by every solver (float32 throughout)."""

from __future__ import annotations

import torch

from ..numerics import is_finite


def as_float(t: torch.Tensor) -> torch.Tensor:
    """float32, except that float64 (used by exact tests) is kept."""
    return t if t.dtype == torch.float64 else t.float()


class HessianError(RuntimeError):
    """A Hessian that stays singular after all damping retries, or holds NaN/Inf."""


def damp(H: torch.Tensor, percdamp: float, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(H + lambda I, dead)`` where ``lambda = percdamp * mean(diag H)`` per matrix.

    Dead inputs (``H_ii = 0``: the column never sees a non-zero activation) get ``H_ii = 1`` so the matrix is
    invertible; their weights do not affect the objective and are set to zero by the caller.
    Works on ``(C, C)`` or batched ``(B, C, C)`` matrices; returns a new tensor (``inplace``: ``H`` itself, when
    it is float32 or float64, with its diagonal changed).
    """
    H = as_float(H) if inplace else as_float(H).clone()
    if not is_finite(H):
        raise HessianError("Hessian holds NaN or Inf")
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    lam = percdamp * diag.mean(dim=-1, keepdim=True)
    diag += lam
    return H, dead


def cholesky_inverse_upper(H: torch.Tensor, percdamp: float = 0.01, retries: int = 6,
                           overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``U = chol(H_damped^-1)^T`` (upper triangular, ``H_damped^-1 = U^T U``) and the damped ``H`` used.

    Damping starts at ``percdamp`` of the mean diagonal and grows tenfold on each failed Cholesky.
    ``overwrite``: ``H`` is the caller's own float32/float64 copy, damped in place (its diagonal restored
    before each retry) and returned as the damped ``H``, one ``C x C`` matrix fewer; the results are the same.
    At most three ``C x C`` matrices besides ``H`` are alive at once.
    """
    diag = torch.diagonal(H, dim1=-2, dim2=-1).clone() if overwrite else None
    for attempt in range(retries):
        # a failed factorization retries with tenfold damping (starting from 1e-4 when none was asked for)
        lam = percdamp * 10**attempt if percdamp > 0 else (0.0 if attempt == 0 else 1e-4 * 10 ** (attempt - 1))
        if diag is not None:
            torch.diagonal(H, dim1=-2, dim2=-1).copy_(diag)
        Hd, _ = damp(H, lam, inplace=diag is not None)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info.max()) == 0:
            # cholesky_solve(I) rather than cholesky_inverse: the latter is ~50x slower on some CPU builds
            eye = torch.eye(Hd.shape[-1], dtype=Hd.dtype, device=Hd.device).expand_as(Hd)
            Hinv = torch.cholesky_solve(eye, L)
            del eye, L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info.max()) == 0 and is_finite(U):
                return U, Hd
    raise HessianError(f"Cholesky failed even with damping {percdamp * 10 ** (retries - 1):g}")


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Boolean mask of inputs whose Hessian diagonal is exactly 0."""
    return torch.diagonal(H, dim1=-2, dim2=-1) == 0
