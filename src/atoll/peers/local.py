"""Peers on one machine (loopback): enrolment, a runner with one thread per peer, D-PSGD's step.

``enrol(dir, n)`` makes a private CA (``deploy.certs``), one TLS server certificate for
127.0.0.1 that every local peer serves with, and one enrolment per peer (a token, or a client
certificate for mutual TLS) whose id is the peer's index. ``run(states, topology, rounds)``
starts a ``Peer`` per state on 127.0.0.1 (port 0), connects them and runs them in threads.
``dpsgd_step(...)`` is the local work of D-PSGD on one peer's data, drawing the same batches
as ``decentralized.dpsgd`` does for that node.
"""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import torch
from torch.func import functional_call

from atoll import rng
from atoll.deploy import certs
from atoll.peers.peer import Peer


def enrol(directory, n: int, *, auth: str = "token") -> list[dict]:
    """Credentials of ``n`` local peers (``Peer``'s ``creds``)."""
    d = certs.init(directory, hosts=("127.0.0.1", "localhost"))
    out = []
    for i in range(n):
        e = certs.issue(d, f"peer{i}", token=(auth == "token"), client_id=i)
        c = {"ca": (d / "ca.pem").read_bytes(), "cert": (d / "server.pem").read_bytes(),
             "key": (d / "server.key").read_bytes()}
        if auth == "token":
            c["token"] = Path(e["token"]).read_text().strip()
        else:
            c["client_cert"], c["client_key"] = Path(e["cert"]).read_bytes(), Path(e["key"]).read_bytes()
        out.append(c)
    registry = certs.load_registry(d)
    return [{**c, "registry": registry} for c in out]


def run(states: list[dict], topology, rounds, *, creds: list[dict], push: bool = False,
        auth: str = "token", round_timeout: float = 30.0, local=None, join_s: float = 600.0,
        byzantine: int | None = None):
    """Run ``len(states)`` peers to the end; ``rounds`` is a count or one per peer (a peer that
    stops early vanishes: its server goes away). ``local[i]`` is peer i's local work or None.
    Returns ``(values, peers)``: each peer's final estimate, and the stopped peers (stats)."""
    n = len(states)
    counts = [rounds] * n if isinstance(rounds, int) else list(rounds)
    peers = [Peer(i, n, topology, s, creds=creds[i], push=push, auth=auth,
                  round_timeout=round_timeout, byzantine=byzantine) for i, s in enumerate(states)]
    out, errors = [None] * n, []
    try:
        addresses = {i: f"127.0.0.1:{p.start()}" for i, p in enumerate(peers)}
        for p in peers:
            p.connect(addresses)

        def go(i):
            try:
                out[i] = peers[i].run(counts[i], local[i] if local else None)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append((i, exc))
            finally:
                peers[i].server.stop(grace=0.2)  # a peer that is done is gone for the others

        threads = [threading.Thread(target=go, args=(i,), name=f"peer{i}") for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(join_s)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"peers still running after {join_s} s")
    finally:
        for p in peers:
            p.stop()
    if errors:
        raise RuntimeError(f"peer {errors[0][0]} failed: {errors[0][1]!r}") from errors[0][1]
    return out, peers


def dpsgd_step(model: torch.nn.Module, data, me: int, *, lr: float = 0.1, batch_size: int = 32,
               local_steps: int = 1, seed: int = 0, push: bool = False):
    """Peer ``me``'s local work in ``decentralized.dpsgd``: ``local_steps`` SGD steps on
    ``data.clients[me]`` with the simulation's batches (its row of the same seeded draw)."""
    n, client = len(data.clients), data.clients[me]
    model = copy.deepcopy(model)  # functional_call swaps a module's parameters: one per peer thread

    def step(r: int, state: dict, weight: torch.Tensor) -> dict:
        for s in range(local_steps):
            g = rng.generator(rng.key(seed, r, s, "dpsgd-batches"))
            idx = (torch.rand(n, batch_size, generator=g)[me] * client.n).long()
            est = {k: v / weight for k, v in state.items()} if push else state
            leaves = {k: v.detach().requires_grad_(True) for k, v in est.items()}
            logits = functional_call(model, leaves, (client.x[idx],))
            loss = torch.nn.functional.cross_entropy(logits, client.y[idx], reduction="sum")
            grads = torch.autograd.grad(loss / batch_size, list(leaves.values()))
            state = {k: state[k] - lr * gk * (weight if push else 1) for k, gk in zip(leaves, grads)}
        return state

    return step
