"""Hadamard matrices of the orders transformers use, and the orthogonal rotations built from them
(ALGORITHMS.md §7).

An order n = m · 2^k is built as K ⊗ S: S Sylvester's ±1 matrix of order 2^k, K a ±1 Hadamard matrix of order m from
Paley's constructions for a prime p (I: m = p + 1, p ≡ 3 mod 4; II: m = 2(p + 1), p ≡ 1 mod 4; m = 1 is Sylvester's
alone). That covers SmolLM2's 576 = 36·16 and 1536 = 12·128, Gemma-3-270M's 640 = 20·32, Llama-3-8B's
14336 = 28·512 and every power of two. Where no m·2^k = n with m ≤ MAX_CORE is constructible here (Llama-2's
11008 = 43·256: 172 needs Williamson's construction, 86 and 43 are no Hadamard orders), K is a seeded random
orthogonal matrix of the odd part instead: still orthogonal and dense, so it spreads outliers as well, but its
entries are not ±1/√n and it costs an m × m product; `Rotation.exact_hadamard` says which was built.

Applying x ↦ x·(K ⊗ S) to rows of length n costs a fast Walsh–Hadamard transform over the 2^k axis (products with
Sylvester factors of order ≤ 128) and one m × m product, never an n × n matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % f for f in range(2, int(p**0.5) + 1))


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) for the quadratic character χ of the integers mod a prime p (χ(0) = 0)."""
    squares = {(x * x) % p for x in range(1, p)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, p)], dtype=torch.float64)
    index = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    return chi[index]


def sylvester(order: int) -> torch.Tensor:
    """Sylvester's ±1 Hadamard matrix of a power-of-two order: S_2n = [[S_n, S_n], [S_n, −S_n]]."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, not {order}")
    S = torch.ones(1, 1, dtype=torch.float64)
    while S.shape[0] < order:
        S = torch.cat([torch.cat([S, S], 1), torch.cat([S, -S], 1)], 0)
    return S


def _paley_1(p: int) -> torch.Tensor:
    """Order p + 1 for a prime p ≡ 3 mod 4: I + S with S = [[0, 1ᵀ], [−1, Q]] skew (Q the Jacobsthal matrix)."""
    S = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(p)
    return torch.eye(p + 1, dtype=torch.float64) + S


def _paley_2(p: int) -> torch.Tensor:
    """Order 2(p + 1) for a prime p ≡ 1 mod 4, from the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]]: each
    0 becomes [[1, −1], [−1, −1]] and each ±1 becomes ±[[1, 1], [1, −1]]."""
    C = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(p)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, one) + torch.kron(torch.eye(p + 1, dtype=torch.float64), zero)


# The largest core order used: applying K costs m multiply-adds per element (11008 = 2 · 5504 has a Paley core of
# order 5504, as slow as a dense rotation; QuaRot's largest core is 172).
MAX_CORE = 256


@lru_cache(maxsize=None)
def hadamard_core(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order m from Paley's constructions (or m = 1, 2), or None if none is built here."""
    if m in (1, 2):
        return sylvester(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley_1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley_2(m // 2 - 1)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n as K ⊗ S (float64), or None if no factorisation m·2^k = n has a K here."""
    m, power = _factor(n)
    return None if m is None else torch.kron(hadamard_core(m), sylvester(power))


def _factor(n: int) -> tuple[int | None, int]:
    """n = m · 2^k with a constructible core of order m ≤ MAX_CORE, the largest 2^k first (the smallest m × m
    product)."""
    power = n & -n
    while power >= 1:
        if n // power <= MAX_CORE and hadamard_core(n // power) is not None:
            return n // power, power
        power //= 2
    return None, n & -n


# Sylvester's matrices factor as S_ab = S_a ⊗ S_b, so x @ S_n is a few products with S of order ≤ FACTOR: BLAS
# products cost FACTOR multiply-adds an element per factor but beat log2(n) butterfly passes in torch (one kernel
# call each, not three), and round once per factor in bfloat16 instead of once per pass.
FACTOR = 128


@lru_cache(maxsize=None)
def _sylvester_as(order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return sylvester(order).to(dtype=dtype, device=device)


def fast_walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ S along the last axis (a power of two, Sylvester's order), unnormalised. With x's rows viewed as
    (n / f, f) matrices X, x @ (S_{n/f} ⊗ S_f) = S_{n/f} X S_f: the f axis by one product, the other recursively."""
    n = x.shape[-1]
    if n <= FACTOR:
        return x @ _sylvester_as(n, x.dtype, x.device)
    X = x.reshape(*x.shape[:-1], n // FACTOR, FACTOR) @ _sylvester_as(FACTOR, x.dtype, x.device)
    return fast_walsh_hadamard(X.transpose(-1, -2)).transpose(-1, -2).reshape(x.shape)


@dataclass
class Rotation:
    """Q = diag(signs) · (K ⊗ S) / √(m·2^k), orthogonal, of order n. K (m × m, float64) is ±1 Hadamard
    (exact_hadamard) or a random orthogonal matrix scaled by √m (the fallback); signs (n,) a random ±1 diagonal or
    None. apply(x) = x @ Q and unapply(x) = x @ Qᵀ along x's last axis, in x's dtype."""

    n: int
    core: torch.Tensor
    power: int
    signs: torch.Tensor | None
    exact_hadamard: bool

    @classmethod
    def build(cls, n: int, seed: int | None = None) -> "Rotation":
        """The rotation of order n; with a seed, random ±1 signs (and, where no Hadamard core exists, the random
        orthogonal core) drawn from it. Without one, a plain normalised Hadamard matrix (or a seed-0 fallback)."""
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        m, power = _factor(n)
        exact = m is not None
        if exact:
            core = hadamard_core(m)
        else:
            m = n // power
            A = torch.randn(m, m, generator=gen, dtype=torch.float64)
            Qr, R = torch.linalg.qr(A)
            core = Qr * torch.sign(torch.diagonal(R)) * m**0.5  # Haar-distributed, then scaled like a ±1 matrix
        signs = None
        if seed is not None:
            signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        return cls(n, core, power, signs, exact)

    def _mix(self, x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        m = core.shape[0]
        y = fast_walsh_hadamard(x.reshape(*x.shape[:-1], m, self.power))
        if m > 1:
            y = torch.einsum("ab,...ai->...bi", core.to(y), y)
        return y.reshape(x.shape) * (1 / self.n**0.5)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q along the last axis."""
        self._check(x)
        if self.signs is not None:
            x = x * self.signs.to(x)
        return self._mix(x, self.core)

    def unapply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Qᵀ along the last axis (S is symmetric, so (K ⊗ S)ᵀ = Kᵀ ⊗ S)."""
        self._check(x)
        y = self._mix(x, self.core.T)
        return y * self.signs.to(y) if self.signs is not None else y

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """Q itself (n × n): for tests and small orders."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).to(dtype)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"a rotation of order {self.n} applied to rows of length {x.shape[-1]}")
