"""SecAgg+ (Bell et al., CCS 2020): the server learns the sum of the clients' vectors in
Z_{2^bits}, and nothing else, while clients drop out at any stage. With ``neighbours >= n - 1``
it is the complete-graph protocol of Bonawitz et al. (CCS 2017).

Four stages, each a client method and a server method over plain messages (bytes and dicts), so
the same objects run in simulation (``run``) and over any transport:

1. ``advertise``: two fresh X25519 key pairs per client: ``c`` (share channel), ``s`` (masks).
2. ``share``: a fresh 256-bit self-mask seed ``b_u`` and the mask key ``s_u`` are Shamir-shared
   t-of-k among the client's neighbours, each share sealed (AES-GCM, bound to session, round,
   sender, receiver) under the pair's channel key; the server only relays ciphertexts.
3. ``masked``: ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) PRG(s_uv) mod 2^bits``,
   ``s_uv`` = X25519(s_u, s_v) through HKDF, sign +1 for u < v and -1 for u > v; sent bit-packed.
4. ``unmask``: for each neighbour the server names, a surviving client reveals the share of
   ``b_v`` (v sent its masked input) or of ``s_v`` (v dropped after sharing), never both for the
   same v, whatever the server asks (the honest-client safety rule); the server rebuilds the
   seeds and removes every mask.

Neighbourhoods: a cycle in an order drawn from the session id, each client joined to the
``neighbours // 2`` clients before and after it (Harary graph, as in Bell et al.). Threshold
``t`` defaults to ``neighbours // 2 + 1``: then no server can collect ``t`` shares of both kinds
for one client from honest neighbours who each reveal one kind. Semi-honest security; against a
malicious server, ``run(..., active=...)`` adds signed keys and the consistency check
(``atoll.secure.active``); what it can still do is in docs/secure-aggregation.md.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag

from atoll.secure import primitives as pr
from atoll.secure import shamir
from atoll.secure.setup import SecAggError, Setup

SEED = 32  # bytes of a self-mask seed and of an X25519 private key


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


@dataclass
class Client:
    setup: Setup
    me: int
    c_sk: bytes = b""
    s_sk: bytes = b""
    b: bytes = b""
    peers: dict = field(default_factory=dict)      # v -> (c_pk, s_pk)
    inbox: dict = field(default_factory=dict)      # v -> ciphertext from v
    revealed: dict = field(default_factory=dict)   # v -> "b" or "s"
    seconds: float = 0.0

    def advertise(self) -> tuple[bytes, bytes]:
        t0 = time.perf_counter()
        self.c_sk, c_pk = pr.keypair()
        self.s_sk, s_pk = pr.keypair()
        self.seconds += time.perf_counter() - t0
        return c_pk, s_pk

    def share(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """``keys``: the advertised keys of the neighbours that are still here."""
        t0, st = time.perf_counter(), self.setup
        mine = st.graph()[self.me]
        self.peers = {v: k for v, k in keys.items() if v in mine}
        if len(self.peers) < st.threshold:
            raise SecAggError(f"client {self.me}: {len(self.peers)} neighbours left, "
                              f"fewer than the threshold {st.threshold}")
        self.b = os.urandom(SEED)
        xs = {v: st.x(v) for v in self.peers}
        sb = shamir.split(self.b, list(xs.values()), st.threshold)
        ss = shamir.split(self.s_sk, list(xs.values()), st.threshold)
        out = {}
        for v, (c_pk, *_) in self.peers.items():
            key = pr.agree(self.c_sk, c_pk, b"channel")
            body = shamir.to_bytes(sb[xs[v]]) + shamir.to_bytes(ss[xs[v]])
            out[v] = pr.seal(key, body, pr.aad(st.session, st.round, self.me, v))
        self.seconds += time.perf_counter() - t0
        return out

    def masked(self, x: np.ndarray, inbox: dict[int, bytes]) -> bytes:
        """``x``: the input, integers in ``[0, 2^bits)``; ``inbox``: ciphertexts addressed to me."""
        t0, st = time.perf_counter(), self.setup
        x = np.asarray(x)
        if x.shape != (st.d,) or x.dtype.kind not in "ui" or (x < 0).any() or (x >= 1 << st.bits).any():
            raise SecAggError(f"client {self.me}: the input must be {st.d} integers in [0, 2^{st.bits})")
        self.inbox = {v: ct for v, ct in inbox.items() if v in self.peers}
        y = x.astype(np.uint32)  # ring sums in uint32, which wraps modulo 2^32: reduce once
        pr.add_prg(y, self.b)
        for v in self.inbox:
            pr.add_prg(y, pr.agree(self.s_sk, self.peers[v][1], b"mask"), _sign(self.me, v))
        y &= np.uint32((1 << st.bits) - 1)
        self.seconds += time.perf_counter() - t0
        return pr.pack(y, st.bits)

    def unmask(self, survivors: set[int], dropped: set[int]) -> dict[int, tuple[str, bytes]]:
        """Reveal the share of ``b_v`` for each survivor, of ``s_v`` for each dropped neighbour.
        Refuses a request that would reveal both kinds for one neighbour, now or with an earlier
        request, and one that leaves fewer than ``threshold`` survivors."""
        t0, st = time.perf_counter(), self.setup
        survivors, dropped = set(survivors), set(dropped)
        if survivors & dropped:
            raise SecAggError(f"client {self.me}: refused: the server names {sorted(survivors & dropped)} "
                              "both survivor and dropped (that would reveal both shares)")
        if not (survivors | dropped) <= set(self.inbox) | {self.me}:
            raise SecAggError(f"client {self.me}: refused: shares asked for clients that sent me none")
        if len(survivors | {self.me}) < st.threshold:
            raise SecAggError(f"client {self.me}: refused: {len(survivors | {self.me})} survivors, "
                              f"fewer than the threshold {st.threshold}")
        want = {v: "b" for v in survivors - {self.me}} | {v: "s" for v in dropped}
        clash = [v for v, kind in want.items() if self.revealed.get(v, kind) != kind]
        if clash:
            raise SecAggError(f"client {self.me}: refused: the other share of {clash} was revealed before")
        out = {}
        for v, kind in want.items():
            key = pr.agree(self.c_sk, self.peers[v][0], b"channel")
            try:
                body = pr.open_(key, self.inbox[v], pr.aad(st.session, st.round, v, self.me))
            except (InvalidTag, ValueError):  # v sealed garbage: nothing of v's to reveal
                continue
            half = len(body) // 2
            out[v] = (kind, body[:half] if kind == "b" else body[half:])
            self.revealed[v] = kind
        self.seconds += time.perf_counter() - t0
        return out


@dataclass
class Server:
    setup: Setup
    keys: dict = field(default_factory=dict)     # U0: u -> (c_pk, s_pk)
    sent: dict = field(default_factory=dict)     # U1: u -> {v: ciphertext}
    inputs: set = field(default_factory=set)     # U2: the clients whose masked vector came
    total: np.ndarray | None = None              # ... and their sum, in uint32
    seconds: float = 0.0         # crypto: rebuilding seeds and expanding masks
    decode_seconds: float = 0.0  # unpacking and summing the masked vectors

    def __post_init__(self):
        self.graph = self.setup.graph()

    def collect_keys(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, dict]:
        """U0's advertised keys; returns what each client receives (its neighbours' keys)."""
        self.keys = {u: k for u, k in keys.items() if u in self.graph}
        return {u: {v: self.keys[v] for v in self.graph[u] if v in self.keys} for u in self.keys}

    def collect_shares(self, sent: dict[int, dict[int, bytes]]) -> dict[int, dict]:
        """U1's sealed shares; returns each client's inbox (ciphertexts addressed to it)."""
        self.sent = {u: m for u, m in sent.items() if u in self.keys}
        inbox: dict[int, dict] = {u: {} for u in self.sent}
        for u, msgs in self.sent.items():
            for v, ct in msgs.items():
                if v in inbox and v in self.graph[u]:
                    inbox[v][u] = ct
        return inbox

    def collect_inputs(self, masked: dict[int, bytes]) -> dict[int, tuple[set, set]]:
        """U2's masked vectors; returns each survivor's unmask request (survivors, dropped)."""
        t0, st = time.perf_counter(), self.setup
        self.inputs = {u for u in masked if u in self.sent}
        self.total = np.zeros(st.d, dtype=np.uint32)  # summed as they come: one vector in memory
        for u in sorted(self.inputs):  # uint32 wraps modulo 2^32, a multiple of the ring's 2^bits
            self.total += pr.unpack(masked[u], st.d, st.bits, np.uint32)
        alive, gone = set(self.inputs), set(self.sent) - set(self.inputs)
        self.decode_seconds += time.perf_counter() - t0
        return {u: ((self.graph[u] & alive) | {u}, self.graph[u] & gone) for u in self.inputs}

    def finish(self, answers: dict[int, dict[int, tuple[str, bytes]]]) -> np.ndarray:
        """The sum of U2's inputs in Z_{2^bits}, from U3's revealed shares; SecAggError where a
        seed cannot be rebuilt (fewer than ``threshold`` shares)."""
        t0, st = time.perf_counter(), self.setup
        chunks = shamir.chunks_for(SEED)
        got: dict[tuple[str, int], dict[int, np.ndarray]] = {}
        for w, revealed in answers.items():
            if w not in self.inputs:
                continue
            for v, (kind, raw) in revealed.items():
                if kind in ("b", "s") and v in self.graph[w]:
                    got.setdefault((kind, v), {})[st.x(w)] = shamir.from_bytes(raw, chunks)
        total = self.total.copy()  # reduced modulo 2^bits once, at the end
        self.decode_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        for u in self.inputs:  # remove every survivor's self mask
            pr.add_prg(total, self._rebuild(got, "b", u), -1)
        for u in set(self.sent) - set(self.inputs):  # dropped after sharing: cancel their pair masks
            partners = [v for v in self.graph[u] & set(self.inputs) if u in self._inbox_of(v)]
            if not partners:
                continue
            s_sk = self._rebuild(got, "s", u)
            if pr.public_of(s_sk) != self.keys[u][1]:
                raise SecAggError(f"secagg: the shares of client {u}'s mask key are inconsistent")
            for v in partners:  # v added sign(v, u) * PRG(s_vu)
                pr.add_prg(total, pr.agree(s_sk, self.keys[v][1], b"mask"), -_sign(v, u))
        total &= np.uint32((1 << st.bits) - 1)
        self.seconds += time.perf_counter() - t0
        return total.astype(np.uint64)

    def _inbox_of(self, v: int) -> set:
        return {u for u, msgs in self.sent.items() if v in msgs and v in self.graph[u]}

    def _rebuild(self, got, kind: str, u: int) -> bytes:
        shares = got.get((kind, u), {})
        if len(shares) < self.setup.threshold:
            raise SecAggError(f"secagg: only {len(shares)} shares of client {u}'s "
                              f"{'self-mask seed' if kind == 'b' else 'mask key'} came back; "
                              f"{self.setup.threshold} are needed")
        return shamir.combine(shares, SEED, self.setup.threshold)


def run(setup: Setup, inputs: dict[int, np.ndarray], drop: dict[int, set] | None = None,
        active=None):
    """All the stages in one process; ``drop[s]``: clients that vanish before stage s (1-4, or
    1-5 with ``active``: the malicious-server protocol, ``atoll.secure.active.Simulated``, whose
    stage 4 is the consistency check). Returns ``(sum, survivors, clients, server)``; the sum
    covers exactly the survivors of stage 3."""
    drop = drop or {}
    alive = set(setup.clients) - drop.get(1, set())
    clients = {u: active.client(setup, u) if active else Client(setup, u) for u in setup.clients}
    server = active.server(setup) if active else Server(setup)
    keys = server.collect_keys(_each(alive, clients, lambda u: clients[u].advertise()))
    alive -= drop.get(2, set())
    inbox = server.collect_shares(_each(alive, keys, lambda u: clients[u].share(keys[u])))
    alive -= drop.get(3, set())
    requests = server.collect_inputs(_each(alive, inbox, lambda u: clients[u].masked(inputs[u], inbox[u])))
    if active is not None:
        alive -= drop.get(4, set())
        signed = _each(alive, requests, lambda u: clients[u].check(server.view()))
        requests = server.collect_views(signed, requests)
    alive -= drop.get(5 if active else 4, set())
    answers = _each(alive, requests, lambda u: clients[u].unmask(*requests[u]))
    return server.finish(answers), set(server.inputs), clients, server


def _each(alive: set, have: dict, step) -> dict:
    """``step(u)`` for every live client the server has a message for; a client that cannot go
    on (``SecAggError``: too few neighbours left, a request it refuses) drops out of the round,
    as a vanished one does, and the server copes or fails."""
    out = {}
    for u in sorted(alive):
        if u in have:
            try:
                out[u] = step(u)
            except SecAggError:
                continue
    return out
