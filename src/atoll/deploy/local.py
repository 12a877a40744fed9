"""Trying a deployment on one machine: enrol every client and write its data file.

``prepare(cfg, directory)`` builds the config's federated data, creates a certificate authority
in ``directory/certs``, enrols ``client-0 .. client-{N-1}`` (ids in order, certificates or
tokens) and writes each client's training split to ``directory/client-i.npz``, the exact tensors
a simulation of the same config trains on. Used by the tests, the benchmark and the docs'
walk-through; a real deployment enrols clients one by one with ``atoll certs client``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from atoll import config as C
from atoll.deploy import certs


def write_client_data(data, directory) -> list[Path]:
    """``client-i.npz`` (``x``, ``y``) for every client of federated ``data``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(data.clients):
        path = d / f"client-{i}.npz"
        np.savez(path, x=c.x.numpy(), y=c.y.numpy())
        paths.append(path)
    return paths


def prepare(cfg: C.Config, directory, *, tokens: bool = False, hosts=("localhost", "127.0.0.1")) -> list[dict]:
    """Certificates (or tokens) and data files for all of ``cfg``'s clients; one dict each."""
    d = Path(directory)
    certs.init(d / "certs", hosts, force=True)
    paths = write_client_data(C.build_data(cfg), d)
    return [{**certs.issue(d / "certs", f"client-{i}", token=tokens, client_id=i), "data": str(p)}
            for i, p in enumerate(paths)]
