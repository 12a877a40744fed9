"""The parameters of one SecAgg+ run (``Setup``), as the server draws them and a client checks
them, and the protocol's error."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass


class SecAggError(RuntimeError):
    """The round cannot finish securely (too few survivors, a refused request)."""


@dataclass(frozen=True)
class Setup:
    session: bytes            # 16 random bytes, fresh per round
    round: int
    clients: tuple[int, ...]  # the cohort, sorted
    neighbours: int
    threshold: int
    bits: int                 # the ring Z_{2^bits}
    d: int                    # vector length

    @staticmethod
    def new(clients, round_: int, d: int, input_bits: int, neighbours: int | None = None,
            threshold: int | None = None, malicious: bool = False) -> "Setup":
        k, t, bits = Setup.derive(len(clients), input_bits, neighbours, threshold, malicious)
        return Setup(os.urandom(16), round_, tuple(sorted(clients)), k, t, bits, d)

    @staticmethod
    def derive(n: int, input_bits: int, neighbours: int | None, threshold: int | None,
               malicious: bool = False):
        """``(neighbours, threshold, bits)`` of a cohort of ``n`` clients under a config; the
        default threshold is a majority of the neighbours, more than two thirds of them against
        a malicious server (Bonawitz et al.'s active bound)."""
        k = min(neighbours if neighbours is not None else n - 1, n - 1)
        k += k % 2 if k < n - 1 else 0  # even on a proper cycle
        k = min(k, n - 1)
        t = threshold if threshold is not None else (2 * k // 3 if malicious else k // 2) + 1
        bits = input_bits + max(1, math.ceil(math.log2(max(n, 2))))
        if bits > 32:
            raise ValueError(f"secagg: {input_bits} input bits over {n} clients need a ring of "
                             f"{bits} bits; at most 32 are supported")
        if not 1 <= t <= k:
            raise ValueError(f"secagg: threshold {t} must be in [1, neighbours={k}]")
        return k, t, bits

    def check(self, me: int, round_: int, d: int, input_bits: int, neighbours: int | None,
              threshold: int | None, malicious: bool = False) -> None:
        """A client's check of a setup the server sent: its round, its length and the
        parameters its own config derives for this cohort (a server cannot lower the
        threshold or shrink the ring); SecAggError names what differs."""
        try:
            want = (round_, d, *Setup.derive(len(self.clients), input_bits, neighbours, threshold,
                                             malicious))
        except ValueError as exc:
            raise SecAggError(f"client {me}: refused the setup: {exc}") from None
        got = (self.round, self.d, self.neighbours, self.threshold, self.bits)
        names = ("round", "length", "neighbours", "threshold", "bits")
        bad = [f"{n} {g} (expected {w})" for n, g, w in zip(names, got, want) if g != w]
        if me not in self.clients:
            bad.append(f"client {me} is not in the cohort")
        if len(set(self.clients)) != len(self.clients) or list(self.clients) != sorted(self.clients):
            bad.append("the cohort is not sorted and distinct")
        if bad:
            raise SecAggError(f"client {me}: refused the setup: " + "; ".join(bad))

    def graph(self) -> dict[int, frozenset]:
        n, k = len(self.clients), self.neighbours
        if k >= n - 1:
            return {u: frozenset(self.clients) - {u} for u in self.clients}
        order = list(self.clients)
        random.Random(self.session).shuffle(order)
        pos = {u: i for i, u in enumerate(order)}
        return {u: frozenset(order[(pos[u] + j) % n] for j in range(-(k // 2), k // 2 + 1) if j)
                for u in self.clients}

    def x(self, u: int) -> int:
        """The Shamir evaluation point of client ``u``."""
        return self.clients.index(u) + 1
