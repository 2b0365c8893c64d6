"""Orthogonal matrices for rotating a model: Hadamard matrices of any order ``2^k m`` with ``m`` a Paley order,
their randomized form, and seeded random orthogonal matrices.

A Hadamard matrix ``H`` of order ``n`` has entries ``+-1`` and ``H H^T = n I``, so ``H / sqrt(n)`` is orthogonal.

* Sylvester: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` (orders ``2^k``).
* Paley I, prime ``q = 3 (mod 4)``: with the Jacobsthal matrix ``Q_ij = chi(j - i)`` (``chi`` the Legendre symbol
  mod ``q``), ``S = [[0, 1^T], [-1, Q]]`` is skew and ``H = I + S`` has order ``q + 1`` (12, 20, 24, 32, 44, ...).
* Paley II, prime ``q = 1 (mod 4)``: ``Q`` is symmetric, ``C = [[0, 1^T], [1, Q]]`` and
  ``H = C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]`` has order ``2 (q + 1)`` (28, 36, 60, ...).
* Kronecker products of Hadamard matrices are Hadamard: order ``n = m 2^k`` is ``H_m (x) H_{2^k}``.

SmolLM2-135M needs 576 = 36 x 16 (residual), 1536 = 12 x 128 (MLP) and 64 (head); 768 = 12 x 64 when padded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from turboboa.errors import UserError


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n = 2^k`` (float64 of +-1)."""
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester's construction needs a power of two, not {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = chi(j - i)`` for a prime ``q``: the Legendre symbol of ``j - i`` mod ``q`` (0 on the diagonal)."""
    squares = torch.zeros(q, dtype=torch.bool)
    squares[(torch.arange(1, q) ** 2) % q] = True
    chi = torch.where(squares, 1.0, -1.0).double()
    chi[0] = 0.0
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def paley(q: int) -> torch.Tensor:
    """Paley's Hadamard matrix for the prime ``q``: order ``q + 1`` (I, ``q = 3 mod 4``) or ``2 (q + 1)`` (II)."""
    if not _is_prime(q) or q == 2:
        raise ValueError(f"Paley's construction here needs an odd prime, not {q}")
    Q = jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    if q % 4 == 3:
        S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = ones, -ones, Q
        return torch.eye(q + 1, dtype=torch.float64) + S
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = ones, ones, Q
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


@cache
def paley_orders(limit: int) -> dict[int, int]:
    """``{order: prime}`` of every Paley matrix of order at most ``limit`` (the smallest prime per order)."""
    orders: dict[int, int] = {}
    for q in range(3, limit + 1):
        if _is_prime(q):
            m = q + 1 if q % 4 == 3 else 2 * (q + 1)
            if m <= limit:
                orders.setdefault(m, q)
    return orders


@cache
def factorization(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m p``, ``p`` a power of two and ``m`` 1 or a Paley order, the smallest such ``m``.

    A width with no such factorization is a one-line UserError."""
    if n < 1:
        raise UserError(f"cannot build a Hadamard matrix of order {n}")
    if is_power_of_two(n):
        return 1, n
    for m in sorted(paley_orders(n)):
        if n % m == 0 and is_power_of_two(n // m):
            return m, n // m
    raise UserError(f"no Hadamard matrix of order {n} is known here (it must be 2^k times a Paley order such as "
                    f"12, 20, 28 or 36); use --rotate random, or --pad-to to a width that has one")


@cache
def _factor_matrix(m: int) -> torch.Tensor:
    if m == 1 or is_power_of_two(m):
        return sylvester(m)
    return paley(paley_orders(m)[m])


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64 of +-1, ``H H^T = n I``): the Kronecker product of the
    factors of :class:`HadamardTransform` (``H_m (x) H_p`` for ``(m, p) = factorization(n)``)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    for F in HadamardTransform(n).factors:
        H = torch.kron(H, F)
    return H


MAX_FACTOR = 256  # largest power-of-two Kronecker factor applied as one dense matrix


@dataclass(frozen=True)
class HadamardTransform:
    """``x -> x H_n / sqrt(n)`` on the last dimension, computed in Kronecker form without the dense ``n x n``
    matrix: ``H_n = F_1 (x) F_2 (x) ... (x) F_r`` (the Paley factor, then Sylvester factors of at most
    :data:`MAX_FACTOR`), and with ``x`` viewed as a tensor of shape ``(f_1, ..., f_r)`` (row-major),
    ``x (F_1 (x) ... (x) F_r)`` multiplies axis ``i`` by ``F_i`` (``y_..j.. = sum_k x_..k.. F_i[k, j]``).

    Orthogonal, so the inverse is ``x -> x H_n^T / sqrt(n)``."""

    n: int

    @property
    def factors(self) -> list[torch.Tensor]:
        m, p = factorization(self.n)
        out = [_factor_matrix(m)] if m > 1 else []
        while p > 1:
            f = min(p, MAX_FACTOR)
            out.append(sylvester(f))
            p //= f
        return out or [sylvester(1)]

    def matrix(self) -> torch.Tensor:
        """The dense orthogonal ``H_n / sqrt(n)`` (float64)."""
        return hadamard_matrix(self.n) / math.sqrt(self.n)

    @property
    def scale(self) -> float:
        """``1 / sqrt(n)`` rounded to float32, the last factor of the transform."""
        return float(torch.tensor(1.0 / math.sqrt(self.n), dtype=torch.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x H_n / sqrt(n)`` along the last dimension, in ``x``'s dtype (float32 arithmetic at least).

        The factors are applied last first, each followed by moving the transformed axis in front of the
        factor axes (after ``r`` steps they are back in order), then one product with :attr:`scale`: the same
        operations, in the same order, as the ONNX exporter's (:mod:`exporters.onnx.dynamic`)."""
        factors = self.factors
        dtype = torch.promote_types(x.dtype, torch.float32)
        r = len(factors)
        Y = x.to(dtype).reshape(*x.shape[:-1], *(f.shape[0] for f in factors))
        for F in reversed(factors):
            Y = torch.matmul(Y, F.to(x.device, dtype))
            if r > 1:
                Y = Y.movedim(-1, -r)
        return (Y.reshape(x.shape) * self.scale).to(x.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` seeded random signs (float64 +-1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def randomized_hadamard(n: int, seed: int) -> torch.Tensor:
    """``Q = diag(s) H_n / sqrt(n)`` with seeded random signs ``s`` (orthogonal, float64)."""
    return random_signs(n, seed)[:, None] * HadamardTransform(n).matrix()


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix: ``Q R = G`` (Gaussian ``G``), ``Q diag(sign(diag R))`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R))[None, :]


def residual_rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    """The residual stream's orthogonal ``Q`` (float64, ``n x n``) for ``--rotate kind``."""
    if kind == "hadamard":
        return randomized_hadamard(n, seed)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise UserError(f"unknown --rotate {kind!r}; choose none, hadamard or random")
