"""``Server``: the coordinator of a deployment, served over gRPC (Python API of ``atoll server``).

    from atoll import config
    from atoll.deploy import Server
    server = Server(config.load("exp.toml"), run_dir="runs/exp")   # TLS + mutual TLS by default
    server.run()                                                    # blocks until the last round

The server builds the algorithm, the model and the plan from the same config file as
``atoll run``; it loads ``[data]`` only for its held-out test set (``data.x_test``), the input and
output sizes of the model and the population size ``data.num_clients``; clients' training data
never reaches it. Enrolled clients (``atoll certs client``) are the population: a client's
enrolment id is the index the sampler draws.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from atoll import config as C
from atoll.deploy import certs
from atoll.deploy.coordinator import Coordinator, Header, RoundPolicy
from atoll.secure.active import CertificatePKI
from atoll.transport.grpc.limits import Limits
from atoll.transport.grpc.server import GrpcServer

log = logging.getLogger("atoll.deploy")


class Server:
    def __init__(self, cfg: C.Config, *, run_dir=None, insecure: bool = False, port: int | None = None,
                 host: str | None = None, certs_dir=None, auth: str | None = None,
                 plots: bool = True, linger_s: float = 2.0, overwrite: bool = False,
                 he: dict | None = None):
        d = cfg.deploy
        if d.rpc_timeout <= d.poll_s:
            raise ValueError(f"deploy.rpc_timeout ({d.rpc_timeout} s) must exceed deploy.poll_s "
                             f"({d.poll_s} s): the server would cut its own long polls")
        self.cfg, self.linger_s = cfg, linger_s
        self.certs_dir = Path(certs_dir or d.certs)
        auth = auth or d.auth
        if insecure:
            log.warning("INSECURE: no TLS; tokens and updates travel in plaintext. "
                        "Use this for local experiments only.")
            auth = "token"
        if cfg.attack.name != "none":
            raise C.ConfigError("[attack] simulates Byzantine clients and runs in simulation only; "
                                "remove it from a deployment's config")
        if cfg.secure.malicious and auth != "mtls":
            raise C.ConfigError("secure.malicious = true: each client signs its secure aggregation "
                                "keys with its enrolment certificate; token-enrolled clients have "
                                "none (use deploy.auth = \"mtls\" and certificate enrolment)")
        self.registry_mtime, self.registry = None, {}
        self._reload()
        algorithm, model, data, plan = C.build(cfg)
        if algorithm.secure is not None and cfg.secure.max_weight is None:  # clients hold no population
            cfg = cfg.model_copy(update={"secure": cfg.secure.model_copy(
                update={"max_weight": algorithm.secure.max_weight})})
        self.shape = {"n_features": data.n_features, "n_classes": data.n_classes,
                      "num_clients": len(data.clients)}
        self.config_text = C.dumps(cfg)
        policy = RoundPolicy(d.round_timeout, d.min_clients, d.min_fraction, d.poll_s,
                             d.max_num_examples, d.max_update_norm, d.max_norm_ratio,
                             cfg.secure.stage_timeout, cfg.secure.stage_quorum)
        self.coordinator = Coordinator(algorithm, model, data, plan,
                                       run_dir=run_dir or Path(cfg.out_dir) / cfg.name,
                                       policy=policy, config_text=self.config_text, plots=plots,
                                       enrolled=self._enrolled, overwrite=overwrite,
                                       he=_he(algorithm, he, insecure))
        if cfg.secure.malicious:
            self.coordinator.secure.pki = CertificatePKI((self.certs_dir / "ca.pem").read_bytes())
            from atoll.deploy.he_rounds import run_id
            self.coordinator.secure.run_id = run_id(self.config_text).encode()  # HE's signed inputs
        tls = None if insecure else {k: (self.certs_dir / f).read_bytes() for k, f in
                                     (("key", "server.key"), ("cert", "server.pem"), ("ca", "ca.pem"))}
        address = f"{host or d.host}:{d.port if port is None else port}"
        limits = Limits(d.handshake_timeout, d.rpc_timeout, d.max_rpcs or 2 * len(data.clients) + 16,
                        d.max_connections, d.keepalive, d.idle_timeout, d.auth_log_per_min)
        self.grpc = GrpcServer(self, self._identify, address=address, tls=tls, auth=auth,
                               chunk_bytes=d.chunk_kb * 1024, limits=limits)
        self.port = self.grpc.port

    def run(self) -> dict | None:
        """Serve until the last round is done (or ``stop()``); returns the final evaluation."""
        self.grpc.start()
        try:
            final = self.coordinator.run()
            time.sleep(self.linger_s)  # let waiting clients hear DONE
            return final
        finally:
            self.grpc.stop(grace=1.0)

    def stop(self) -> None:
        self.coordinator.stop()

    # ---- the backend the gRPC layer calls ----------------------------------------------------
    def join(self, name: str, cid: int) -> dict:
        self.coordinator.seen(cid)
        log.info("client %s (id %d) joined", name, cid)
        return {"client_id": cid, "name": name, "config_toml": self.config_text,
                "max_update_bytes": self.coordinator.max_update_bytes, **self.shape}

    def next_task(self, cid: int, wait_s: float, held=None):
        return self.coordinator.next_task(cid, wait_s, held)

    def submit(self, cid: int, head: dict, chunks) -> tuple[bool, str]:
        return self.coordinator.submit(cid, Header(**head), chunks)

    def status(self) -> dict:
        s = self.coordinator.status()
        last = s.pop("last_metrics")
        return {**s, "clients_enrolled": sum(e["id"] is not None for e in self.registry.values()),
                "last_metrics_json": json.dumps(last)}

    def _identify(self, kind: str, value) -> tuple[str, int | None] | None:
        self._reload()
        name = (certs.by_certificate(self.registry, value) if kind == "cert"
                else certs.by_token(self.registry, value))
        if name is None:
            return None
        cid = self.registry[name]["id"]
        if cid is not None and not 0 <= cid < self.shape["num_clients"]:
            log.warning("client %s has id %d outside this run's %d clients (data.num_clients)",
                        name, cid, self.shape["num_clients"])
            return None
        return name, cid

    def _enrolled(self) -> set[int]:
        """Ids of the clients enrolled now: a revoked (or not yet enrolled) client is not sampled."""
        self._reload()
        return {e["id"] for e in self.registry.values() if e["id"] is not None}

    def _reload(self) -> None:
        """Re-read the registry when it changed (enrolments and revocations take effect live)."""
        path = self.certs_dir / certs.REGISTRY
        mtime = os.stat(path).st_mtime_ns if path.exists() else None
        if mtime is None or mtime != self.registry_mtime:  # a missing registry is an error
            self.registry = certs.load_registry(self.certs_dir)
            self.registry_mtime = mtime


def _he(algorithm, he: dict | None, insecure: bool):
    """Homomorphic encryption: ``he`` = ``{"public_key": path, "decryptors": [HOST:PORT, ...],
    "ca": path(s), "token": path(s)}`` (``atoll server --he-*``) -> ``he_rounds.link``'s pair."""
    from atoll.deploy.he_client import is_he
    from atoll.deploy.he_rounds import link

    given = bool(he and (he.get("public_key") or he.get("decryptors")))
    if not is_he(algorithm.secure):
        if given:
            raise C.ConfigError("--he-public-key / --he-decryptor need secure.method = ckks or paillier")
        return None
    if not (given and he.get("public_key") and he.get("decryptors")):
        return None  # the coordinator says what is missing
    return link(algorithm.secure, he["public_key"], he["decryptors"], ca=he.get("ca"),
                token=he.get("token"), insecure=insecure)
