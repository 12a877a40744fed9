"""Homomorphic encryption in deployment: a server, one decryptor service and n clients (threads
of this process) over loopback gRPC with TLS and tokens, ``[secure] method = "ckks"`` (or
"paillier"); the same deployment without ``[secure]`` runs after it in the same process.
Prints the median round wall (the first round, which includes the clients joining, counts as
one of them), bytes up and down per client, the server's HE seconds (adding the ciphertexts,
and the decryptor's round trip) and the final test accuracy of both. With ``--malicious`` the
HE deployment also runs with ``[secure] malicious = true`` (certificate-enrolled clients sign
their ciphertexts, decryptors started with the clients' CA check and sum them), and a line per
HE run gives what one decryptor receives per round and its own seconds per round.

    PYTHONPATH=src python bench/he_deploy.py [--clients 8] [--rounds 5] [--hidden 64]
                                             [--method ckks] [--bits 2048] [--decryptors 1]
                                             [--malicious]

All parties share this machine's cores and Python's GIL: the walls are an upper bound on what
separate machines would see.
"""
import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.deploy.he_helpers

from atoll import config  # noqa: E402
from atoll.deploy import local  # noqa: E402
from atoll.secure.he_keys import Decryptor  # noqa: E402
from tests.deploy.he_helpers import deal, decryptors, start  # noqa: E402

TOML = """
name = "he-bench"
rounds = {rounds}
dtype = "float64"
[data]
name = "digits"
num_clients = {clients}
[model]
hidden = [{hidden}]
[client]
batch_size = 32
[deploy]
round_timeout = 300
"""
HE = '[secure]\nmethod = "{method}"\ndecryptors = {t}\nstage_timeout = 300\n'


class Timed(Decryptor):
    """A decryptor that records its own seconds per request (``decrypt`` / ``decrypt_signed``)."""
    seconds: list = []

    def decrypt(self, *a):
        t0 = time.perf_counter()
        out = super().decrypt(*a)
        Timed.seconds.append(time.perf_counter() - t0)
        return out

    def decrypt_signed(self, *a):
        t0 = time.perf_counter()
        out = super().decrypt_signed(*a)
        Timed.seconds.append(time.perf_counter() - t0)
        return out


def deploy(text: str, he: tuple | None, malicious: bool = False):
    """One deployment of ``text`` (with ``he``: (method, decryptors, bits)); its metrics lines
    and the wall of each round."""
    tmp = Path(tempfile.mkdtemp(prefix="atoll-he-bench-"))
    (tmp / "exp.toml").write_text(text)
    cfg = config.load(tmp / "exp.toml")
    servers, opts, pin, enrolled = [], None, None, None
    if malicious:  # certificates: each client signs its ciphertext; the decryptors trust the CA
        enrolled = local.prepare(cfg, tmp)
    if he is not None:
        keys = deal(tmp, he[0], he[1], he[2])
        servers, opts = decryptors(tmp, keys["shares"], backend=Timed,
                                   client_ca=tmp / "certs" / "ca.pem" if malicious else None)
        opts, pin = {"public_key": keys["public"], **opts}, keys["public"]
    try:
        server, thread, _, threads = start(cfg, tmp, opts, pin, enrolled=enrolled)
        thread.join(3600)
        for t in threads:
            t.join(60)
    finally:
        for s in servers:
            s.stop()
    lines = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    timings = [json.loads(ln)["wall_s"] for ln in (tmp / "run" / "timings.jsonl").read_text().splitlines()]
    return lines, [b - a for a, b in zip([0.0] + timings, timings)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--method", default="ckks", choices=["ckks", "paillier"])
    ap.add_argument("--bits", type=int, default=2048)
    ap.add_argument("--decryptors", type=int, default=1)
    ap.add_argument("--malicious", action="store_true", help="also [secure] malicious = true")
    a = ap.parse_args()
    logging.getLogger("atoll.deploy").setLevel(logging.ERROR)  # the clients' policy notes
    text = TOML.format(rounds=a.rounds, clients=a.clients, hidden=a.hidden)
    t0 = time.perf_counter()
    he_text, he = text + HE.format(method=a.method, t=a.decryptors), (a.method, a.decryptors, a.bits)
    runs = [("he", *deploy(he_text, he))]
    decs = [("he", list(Timed.seconds))]
    if a.malicious:
        Timed.seconds.clear()
        runs.append(("he malicious", *deploy(he_text + "malicious = true\n", he, malicious=True)))
        decs.append(("he malicious", list(Timed.seconds)))
    runs.append(("plaintext", *deploy(text, None)))
    d = 64 * a.hidden + a.hidden + a.hidden * 10 + 10
    print(f"{a.method} (decryptors {a.decryptors}), n = {a.clients}, d = {d}, {a.rounds} rounds, "
          f"loopback TLS ({time.perf_counter() - t0:.1f} s in all)")
    print("deployment   round wall s   bytes up / client   bytes down / client   server HE s   test acc")
    for name, lines, walls in runs:
        med = lambda f: statistics.median(f(ln) for ln in lines)  # noqa: E731
        up = med(lambda ln: ln["bytes_up"] / max(ln["clients_succeeded"], 1))
        down = med(lambda ln: ln["bytes_down"] / max(ln["clients_sampled"], 1))
        server_s = med(lambda ln: ln.get("secure_server_s", 0.0) + ln.get("secure_decrypt_s", 0.0))
        print(f"{name:12} {statistics.median(walls):12.3f}   {up:17,.0f}   {down:19,.0f}   "
              f"{server_s:11.3f}   {lines[-1].get('test_acc', float('nan')):.4f}")
    he_lines = runs[0][1]
    print(f"HE ciphertext per client: {statistics.median(ln['secure_bytes_up'] for ln in he_lines):,} "
          f"bytes (float64 update: {8 * d:,})")
    print("run            bytes to each decryptor / round   decryptor s / request (median, max)")
    for (name, lines, _), (_, secs) in zip(runs, decs):
        sent = statistics.median(ln["secure_decryptor_bytes"] for ln in lines)
        print(f"{name:14} {sent:31,.0f}   {statistics.median(secs):.3f}, {max(secs):.3f}")


if __name__ == "__main__":
    main()
