"""Secure aggregation as the round's sum: the server learns the cohort's weighted mean update and
nothing about any one client's (SecAgg+, ``atoll.secure.secagg``).

Client half, ``SecureSum.encode(delta, n, key)``: clamp every coordinate to ``[-clip, clip]``,
weigh by ``w = min(n, max_weight) / max_weight`` (``n``: the client's public record count), scale
to ``input_bits``-bit signed integers by unbiased stochastic rounding (from the client's own
key), and append the weight itself, quantized the same way, as one more coordinate. Weighted
FedAvg thus needs no second protocol: the secure sum carries ``sum w_k x_k`` and ``sum w_k``
together (as Flower's SecAgg+ carries its counts).

Server half, ``SecureSum.aggregate(inputs, round)``: the four SecAgg+ stages over the survivors'
vectors (``secagg.run``: real X25519 / AES-GCM / Shamir, all in this process), ring
``Z_{2^(input_bits + ceil(log2 n))}`` so the sum never wraps; the weighted mean is
``sum_vec / sum_weight * clip``. Exact: the unmasked sum equals the plain integer sum bit for bit
(tested); the only error against plaintext FedAvg is the quantization, ``<= clip / (2^(b-1) - 1)``
per coordinate and client before averaging, unbiased.

In simulation the client half runs where the runtime hands the server a client's message (the
client's delta is never combined with another's outside the protocol); a deployed client runs
it before sending. What the server cannot do under a secure sum, and therefore refuses at build
time: robust aggregators (they need the rows), a server step that reads the clients' ``aux``,
non-linear uplink codecs, and per-client norm checks (a malicious client can shift the sum by
at most ``clip`` per coordinate, its quantization range).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from atoll import rng
from atoll import tree as T
from atoll.secure import secagg
from atoll.secure.active import Simulated
from atoll.secure.distributed import Skellam


@dataclass(frozen=True)
class SecureSum:
    clip: float
    max_weight: float
    input_bits: int = 16
    neighbours: int | None = None
    threshold: int | None = None
    dropout: float = 0.0    # simulation: this fraction of the clients vanishes ...
    dropout_stage: int = 3  # ... before this protocol stage (1 keys, 2 shares, 3 input, 4 unmask)
    noise: Skellam | None = None  # distributed DP: each client's L2 clip, rounding and noise
    bucket: int | None = None  # robust aggregation over the means of secure sums of this many clients
    malicious: bool = False  # against a malicious server: signed keys, the consistency check (secure.active)

    def __post_init__(self):
        if not (self.clip > 0 and self.max_weight > 0):
            raise ValueError(f"secure: clip and max_weight must be > 0, got {self.clip}, {self.max_weight}")
        stages = 5 if self.malicious else 4
        if not (0 <= self.dropout < 1 and 1 <= self.dropout_stage <= stages):
            raise ValueError(f"secure: dropout must be in [0, 1) and dropout_stage in 1..{stages}, "
                             f"got {self.dropout}, {self.dropout_stage}")
        if not 2 <= self.input_bits <= 24:
            raise ValueError(f"secure.bits must be in [2, 24], got {self.input_bits}")

    @property
    def top(self) -> int:
        return (1 << (self.input_bits - 1)) - 1

    def encode(self, delta: dict, n: float, key: int) -> np.ndarray:
        """The client half: ``d + 1`` signed integers with ``|v| <= 2^(bits-1) - 1``; with
        ``noise``, ``d`` integers (clipped, rounded and noised; no weight: every client counts
        one, and the mean is over the survivors). ``key``: the client's own (its secret when
        deployed with noise)."""
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v in delta.values()])
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("secure: the update is not finite")
        if self.noise is not None:
            return self.noise.encode(flat.numpy(), np.random.default_rng(rng.fold(key, "secure")))
        w = min(float(n), self.max_weight) / self.max_weight
        x = torch.cat([flat.clamp(-self.clip, self.clip) * (w / self.clip),
                       torch.tensor([w], dtype=torch.float64)]) * self.top
        u = torch.rand(x.shape, generator=rng.generator(rng.fold(key, "secure")), dtype=torch.float64)
        return torch.floor(x + u).to(torch.int64).numpy()  # E[floor(x + u)] = x

    def buckets(self, clients: list[int], key: int) -> list[list[int]]:
        """The round's random buckets of ``bucket`` clients (one bucket without ``bucket``); a
        short last bucket joins the one before (a bucket of one would be no secret)."""
        if not self.bucket:
            return [sorted(clients)]
        order = np.random.default_rng(key).permutation(sorted(clients)).tolist()
        groups = [order[i:i + self.bucket] for i in range(0, len(order), self.bucket)]
        if len(groups) > 1 and len(groups[-1]) < self.bucket:
            last = groups.pop()
            groups[-1] = groups[-1] + last
        return [sorted(g) for g in groups]

    def length(self, d: int) -> int:
        """The length of an encoded input for a model of ``d`` numbers (the weight is one more,
        except with distributed noise, where every client counts one)."""
        return d if self.noise is not None else d + 1

    def dropped(self, clients: list[int], round_: int) -> set[int]:
        """Simulation: the clients that vanish in round ``round_`` (seeded by the round)."""
        order = np.random.default_rng(rng.key(0, round_, rng.SERVER, "secure-drop")).permutation(clients)
        return set(order[:int(self.dropout * len(clients))].tolist())

    def setup(self, clients, round_: int, d: int) -> secagg.Setup:
        """The protocol's parameters for these clients; SecAggError where none fit."""
        try:
            return secagg.Setup.new(clients, round_, d, self.input_bits, self.neighbours,
                                    self.threshold, self.malicious)
        except ValueError as exc:
            raise secagg.SecAggError(str(exc)) from None

    def check(self, setup: secagg.Setup, me: int, round_: int, d: int) -> None:
        """A deployed client's check of the setup its server sent (``Setup.check``); with
        ``bucket``, a cohort smaller than a bucket is refused (a server that put a client in a
        bucket of one, or with only its own sybils, would learn that client's update)."""
        setup.check(me, round_, d, self.input_bits, self.neighbours, self.threshold, self.malicious)
        if self.bucket and len(setup.clients) < self.bucket:
            raise secagg.SecAggError(f"client {me}: refused the setup: a cohort of "
                                     f"{len(setup.clients)} clients, smaller than the bucket size "
                                     f"aggregator.bucket = {self.bucket}")

    @staticmethod
    def ring(x: np.ndarray, setup: secagg.Setup) -> np.ndarray:
        """A client's encoded input as elements of the protocol's ring."""
        return (x.astype(np.int64) & ((1 << setup.bits) - 1)).astype(np.uint64)

    def aggregate(self, inputs: dict[int, np.ndarray], round_: int, like: dict) -> tuple[dict, dict]:
        """The server half: ``(weighted mean delta like ``like``, stats)`` from the survivors'
        encoded vectors; raises ``secagg.SecAggError`` when the round cannot finish securely."""
        clients = sorted(inputs)
        d = len(next(iter(inputs.values())))
        setup = self.setup(clients, round_, d)
        ring = {u: self.ring(v, setup) for u, v in inputs.items()}
        drop = {self.dropout_stage: self.dropped(clients, round_)} if self.dropout > 0 else {}
        t0 = time.perf_counter()
        total, survivors, parties, _ = secagg.run(setup, ring, drop, Simulated() if self.malicious else None)
        seconds = time.perf_counter() - t0
        stats = {"secure_survivors": len(survivors), "secure_bits": setup.bits,
                 "secure_bytes_up": math.ceil(d * setup.bits / 8),
                 "secure_client_s": round(max(p.seconds for p in parties.values()), 4),
                 "secure_server_s": round(seconds - sum(p.seconds for p in parties.values()), 4)}
        return self.mean(total, setup, like, len(survivors)), stats

    def mean(self, total: np.ndarray, setup: secagg.Setup, like: dict, survivors: int) -> dict:
        """The weighted mean delta (a tree like ``like``) from the unmasked ring sum of the
        inputs of ``survivors`` clients."""
        signed = total.astype(np.int64)
        signed = np.where(signed >= 1 << (setup.bits - 1), signed - (1 << setup.bits), signed)
        if self.noise is not None:
            try:
                mean = torch.from_numpy(self.noise.decode(signed, survivors))
            except ValueError as exc:
                raise secagg.SecAggError(str(exc)) from None
        else:
            weight = float(signed[-1])
            if weight <= 0:
                raise secagg.SecAggError("secure: the summed weight is not positive")
            mean = torch.from_numpy(signed[:-1].astype(np.float64) / weight * self.clip)
        dtype = next(iter(like.values())).dtype
        return {k: v.to(dtype) for k, v in T.unflatten(mean, like).items()}
