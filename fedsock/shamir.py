"""Shamir's secret sharing over GF(2^521 − 1), and rebuilding a secret when some shares are bad.

A secret s is split into the values f(x) of a random polynomial f of degree t − 1 with f(0) = s,
one per holder x; any t of them give s back by Lagrange interpolation at 0, and fewer say nothing
about it. This is written here (about 40 lines) because the well-kept library for it, PyCryptodome,
shares 16-byte secrets only and would add a second crypto library.

Bad shares. A holder that changes its share (one flipped bit will do) makes the interpolation give
another number, and nothing in the arithmetic says so. So `rebuild` takes a check of the secret
itself (secure aggregation has one for each of its secrets: the mask key must give the public key
it was advertised with, the self-mask seed must give the commitment sent with it), and uses the
shares beyond the t it needs (the spares) to find t good ones. With h shares and
e = ⌊(h − t)/2⌋:

1. The first t holders, those not yet caught with a bad share first: one interpolation, the usual
   case. The spares are checked against the same polynomial, to name the holder of any bad one.
2. If that fails, or too many spares disagree with it (more than ⌊(h − t + 1)/2⌋: then the first
   t may hold bad shares that cancel out): Berlekamp–Welch decoding (the shares are a
   Reed–Solomon codeword of length h and dimension t). It finds f whenever at most e shares are
   bad, whoever sent them and however they were chosen: one linear system of h equations,
   O(h³) field operations (a few hundredths of a second at h = 50).
3. Beyond e bad shares no decoder can tell f from every other polynomial by the shares alone,
   but the check can: the t-subsets that swap k of the first t for k spares, k = 1, 2, …, each
   interpolated and checked, at most MAX_TRIES of them. With 2,000 tries that is every t-subset
   of every round of up to 14 clients at the default threshold of 2/3 (C(14, 10) = 1,001), so
   there the secret is found whenever t good shares exist.

So the work per secret is bounded: 1 + MAX_TRIES interpolations of O(t²) and one O(h³) solve,
about a second at 50 clients in the worst case, a millisecond in the usual one.

Who sent a bad share: the holders whose shares are off the rebuilt polynomial. That is exact when
at most e shares are bad (only f is that close to the shares), or when one is (a single bad share
cannot pass the check among t − 1 good ones). Beyond, bad shares that happen to fit each other
(two holders that flip the same bit can do it) may make a good share look like the bad one; the
secret is right all the same, since it passed its check.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Collection, Iterable, Mapping

PRIME = 2**521 - 1  # a Mersenne prime: every 32-byte secret is below it
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_TRIES = 2000  # t-subsets tried per secret after Berlekamp–Welch fails (about 0.5 ms each at t = 34)


def split(secret: int, holders: Iterable[int], threshold: int) -> dict[int, int]:
    """Shares of `secret` for each holder (a distinct id >= 1): f(holder) for a random f of degree t - 1."""
    holders = list(holders)
    if not 0 <= secret < PRIME or threshold < 1 or len(set(holders)) != len(holders) or min(holders) < 1:
        raise ValueError("bad Shamir parameters")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: evaluate(coefficients, x) for x in holders}


def evaluate(coefficients: list[int], x: int) -> int:
    """The polynomial with these coefficients (lowest first) at x (Horner's rule)."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


@functools.lru_cache(maxsize=256)
def lagrange(xs: tuple[int, ...], at: int = 0) -> dict[int, int]:
    """The coefficients λ_i with f(at) = Σ λ_i f(x_i), for any f of degree < len(xs). Cached: a round
    uses the same holders for every secret they share."""
    out = {}
    for i in xs:
        numerator, denominator = 1, 1
        for j in xs:
            if j != i:
                numerator = numerator * (at - j) % PRIME
                denominator = denominator * (i - j) % PRIME
        out[i] = numerator * pow(denominator, -1, PRIME) % PRIME
    return out


def combine(shares: Mapping[int, int], at: int = 0) -> int:
    """The polynomial through these shares at `at`; at 0, the secret."""
    coefficients = lagrange(tuple(sorted(shares)), at)
    return sum(coefficients[x] * y for x, y in shares.items()) % PRIME


# --------------------------------------------------------------------------- decoding with bad shares


def solve(rows: list[list[int]]) -> list[int] | None:
    """One solution of a linear system over GF(PRIME) (each row: its coefficients, then the right-hand
    side), free unknowns 0; None if it has none. Gauss–Jordan elimination."""
    rows = [list(row) for row in rows]
    unknowns = len(rows[0]) - 1
    pivots: list[int] = []
    for column in range(unknowns):
        r = len(pivots)
        pivot = next((i for i in range(r, len(rows)) if rows[i][column]), None)
        if pivot is None:
            continue
        rows[r], rows[pivot] = rows[pivot], rows[r]
        inverse = pow(rows[r][column], -1, PRIME)
        rows[r] = [value * inverse % PRIME for value in rows[r]]
        for i, row in enumerate(rows):
            if i != r and row[column]:
                factor = row[column]
                rows[i] = [(a - factor * b) % PRIME for a, b in zip(row, rows[r])]
        pivots.append(column)
    if any(row[-1] for row in rows[len(pivots):]):  # a row 0 = c with c != 0
        return None
    solution = [0] * unknowns
    for r, column in enumerate(pivots):
        solution[column] = rows[r][-1]
    return solution


def divide(numerator: list[int], monic: list[int]) -> tuple[list[int], list[int]]:
    """Polynomial long division by a monic polynomial (coefficients lowest first): quotient, remainder."""
    remainder = list(numerator)
    degree = len(monic) - 1
    quotient = [0] * max(len(remainder) - degree, 0)
    for i in range(len(remainder) - 1, degree - 1, -1):
        c = quotient[i - degree] = remainder[i]
        for j in range(degree + 1):
            remainder[i - degree + j] = (remainder[i - degree + j] - c * monic[j]) % PRIME
    return quotient, remainder[:degree]


def berlekamp_welch(shares: Mapping[int, int], threshold: int) -> list[int] | None:
    """The coefficients of the polynomial f of degree < t that all but at most e = ⌊(h − t)/2⌋ of the
    h shares lie on, or None when there is none. (Berlekamp and Welch, 1986: with an error locator E
    of degree e, zero where a share is bad, and Q = f·E, each share (x, y) gives one linear equation
    Q(x) = y·E(x); any solution of the system has Q/E = f.)"""
    e = (len(shares) - threshold) // 2
    rows = []
    for x, y in shares.items():
        powers = [pow(x, j, PRIME) for j in range(e + threshold + 1)]
        # unknowns: Q's e + t coefficients, then E's e lowest ones (E is monic: its x^e coefficient is 1)
        rows.append(powers[:e + threshold] + [-y * p % PRIME for p in powers[:e]] + [y * powers[e] % PRIME])
    solution = solve(rows)
    if solution is None:
        return None
    f, remainder = divide(solution[:e + threshold], solution[e + threshold:] + [1])
    return None if any(remainder) else f


@dataclass(frozen=True)
class Rebuilt:
    """What `rebuild` found."""

    secret: int | None  # None: no t of the shares rebuild a secret that passes its check
    bad: frozenset[int] = frozenset()  # the holders whose shares are off the rebuilt polynomial
    searched_all: bool = True  # with no secret: False when the search stopped at MAX_TRIES


def rebuild(shares: Mapping[int, int], threshold: int, valid: Callable[[int], bool],
            suspects: Collection[int] = ()) -> Rebuilt:
    """The secret that t of the shares rebuild and `valid` accepts, and who sent bad shares (see the
    module's docstring for the order of tries and their bound). `suspects`, holders caught with a bad
    share of another secret, are used last."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    holders = sorted(shares, key=lambda x: (x in suspects, x))
    first, spares = holders[:threshold], holders[threshold:]
    most_found = (len(holders) - threshold) // 2  # e: what Berlekamp–Welch corrects
    # Two polynomials through the checked secret agree on at most t − 2 shares. So while at most
    # ⌊(h − t + 1)/2⌋ shares are bad, a valid polynomial with no more shares off it than that is f;
    # with more off, the first t may hold bad shares that cancel out, and decoding decides.
    surely_f = (len(holders) - threshold + 1) // 2

    def off(subset: list[int]) -> frozenset[int]:
        """The holders whose shares are not on the polynomial through the shares of `subset`."""
        on = {x: shares[x] for x in subset}
        return frozenset(x for x in holders if x not in on and combine(on, x) != shares[x])

    secret = combine({x: shares[x] for x in first})
    first_valid = valid(secret)
    if first_valid and len(bad := off(first)) <= surely_f:
        return Rebuilt(secret, bad)
    if most_found > 0 and (f := berlekamp_welch(shares, threshold)) is not None and valid(f[0]):
        return Rebuilt(f[0], frozenset(x for x in holders if evaluate(f, x) != shares[x]))
    if first_valid:  # decoding found no f: many shares are bad, but the first t's secret is valid all the same
        return Rebuilt(secret, bad)
    tries = 0
    for k in range(1, min(len(first), len(spares)) + 1):
        for out in combinations(first, k):
            for into in combinations(spares, k):
                if tries == MAX_TRIES:
                    return Rebuilt(None, searched_all=False)
                tries += 1
                subset = [x for x in first if x not in out] + list(into)
                secret = combine({x: shares[x] for x in subset})
                if valid(secret):
                    return Rebuilt(secret, off(subset))
    return Rebuilt(None)
