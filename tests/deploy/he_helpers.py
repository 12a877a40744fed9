"""Loopback set-up for homomorphic encryption in deployment: the dealer's keys, one decryptor
service per share (each with its own CA and the coordinator enrolled by token), the server and
clients pinned to the public key."""
import threading

from atoll import config
from atoll.deploy import certs, local
from atoll.deploy.client import Client
from atoll.deploy.server import Server
from atoll.secure.active import CertificatePKI
from atoll.secure.he_keys import Decryptor, keygen
from atoll.transport.grpc.he import DecryptorServer

from .conftest import ServerThread, small_config
from .test_secure import creds, finish  # noqa: F401 -- finish: re-exported for the HE tests


def he_config(tmp, method, clients=4, rounds=2, decryptors=1, extra="", hidden=16):
    small_config(tmp, rounds=rounds, clients=clients, timeout=30.0)
    text = ('dtype = "float64"\n' + (tmp / "exp.toml").read_text().replace("[16]", f"[{hidden}]")
            + f'[secure]\nmethod = "{method}"\ndecryptors = {decryptors}\nstage_timeout = 20\n' + extra)
    (tmp / "exp.toml").write_text(text)
    return config.load(tmp / "exp.toml")


def deal(tmp, method, decryptors=1, bits=1024, name="he"):
    return keygen(method, decryptors, tmp / name, bits)


def decryptors(tmp, shares, backend=Decryptor, name="dec", client_ca=None):
    """One started ``DecryptorServer`` per share: ``(servers, he options for Server)``; with
    ``client_ca`` (a ca.pem) they open only signed inputs ([secure] malicious)."""
    pki = None if client_ca is None else CertificatePKI(open(client_ca, "rb").read())
    servers, addrs, cas, tokens = [], [], [], []
    for i, share in enumerate(shares):
        d = tmp / f"{name}{i}"
        certs.init(d, force=True)
        e = certs.issue(d, "coordinator", token=True, observer=True)

        def identify(kind, value, d=d):
            n = certs.by_token(certs.load_registry(d), value) if kind == "token" else None
            return (n, n) if n else None

        tls = {k: (d / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                     ("ca", "ca.pem"))}
        s = DecryptorServer(backend(share, pki=pki), identify, address="127.0.0.1:0", tls=tls)
        addrs.append(f"127.0.0.1:{s.start()}")
        servers.append(s)
        cas.append(e["ca"])
        tokens.append(e["token"])
    return servers, {"decryptors": addrs, "ca": cas, "token": tokens}


def start(cfg, tmp, he: dict, pin, clients=None, enrolled=None):
    """The server with ``he`` (``public_key`` and decryptors) and clients pinned to ``pin``;
    ``enrolled`` (``local.prepare``'s, certificates: mutual TLS) or token-enrolled clients."""
    enrolled = enrolled or local.prepare(cfg, tmp, tokens=True)
    auth = "token" if enrolled[0].get("token") else "mtls"
    server = Server(cfg, run_dir=tmp / "run", certs_dir=tmp / "certs", host="127.0.0.1", port=0,
                    auth=auth, plots=False, linger_s=0.5, he=he)
    thread = ServerThread(server)
    policy = {"secure": {"he_public_key": str(pin)}}
    parties = [Client(f"127.0.0.1:{server.port}", e["data"], **creds(e),
                      backoff=(0.1, 1.0), give_up_s=20, policy=policy) for e in enrolled]
    threads = [threading.Thread(target=p.run, daemon=True) for p in parties]
    for t in threads:
        t.start()
    return server, thread, parties, threads
