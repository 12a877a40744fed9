"""``atoll he keygen | serve``: the dealer and the decryptors of homomorphic encryption in
deployment (docs/secure-aggregation.md, "Homomorphic encryption")."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path


def register(sub) -> None:
    he = sub.add_parser("he", help="homomorphic encryption: the key dealer and the decryptors",
                        description="Deal the key pair of a [secure] method = ckks | paillier "
                                    "deployment and serve a decryptor's share.")
    hsub = he.add_subparsers(dest="he_command", required=True, metavar="ACTION")
    kg = hsub.add_parser("keygen", help="deal the key pair: public.key and one share per decryptor")
    kg.add_argument("--method", required=True, choices=["ckks", "paillier"])
    kg.add_argument("--decryptors", type=int, default=1, metavar="T",
                    help="parties that must all decrypt together (paillier; ckks: 1)")
    kg.add_argument("--bits", type=int, default=2048, help="Paillier modulus bits (default 2048)")
    kg.add_argument("--out", required=True, metavar="DIR")
    kg.set_defaults(func=_keygen)
    sv = hsub.add_parser("serve", help="serve one decryptor's share to the coordinator")
    sv.add_argument("--key", required=True, metavar="SHARE", help="share-<i>.key from keygen")
    sv.add_argument("--certs", default="certs", help="this decryptor's folder: ca.pem, server.pem, "
                    "server.key and clients.json enrolling the coordinator (atoll certs)")
    sv.add_argument("--auth", default="token", choices=["token", "mtls"])
    sv.add_argument("--host", default="[::]")
    sv.add_argument("--port", type=int, default=7071)
    sv.add_argument("--min-clients", type=int, default=2, help="fewest updates in a sum it opens")
    sv.add_argument("--ledger", metavar="FILE", help="the rounds it has opened, kept across restarts "
                    "(default: SHARE.opened; delete it only for a new key)")
    sv.add_argument("--client-ca", metavar="CA.PEM", help="[secure] malicious = true: the clients' "
                    "CA (the server's certs/ca.pem); open only inputs signed by enrolled clients, "
                    "never a sum the server made")
    sv.set_defaults(func=_serve)


def _keygen(args) -> int:
    from atoll.secure.he_keys import keygen

    out = keygen(args.method, args.decryptors, args.out, args.bits)
    print(f"wrote {out['public']} (give it to the clients and the server; fingerprint "
          f"{out['fingerprint']}) and {', '.join(map(str, out['shares']))} (mode 0600: one to each "
          "decryptor); this process kept no key: delete any other copy", flush=True)
    return 0


def _serve(args) -> int:
    from atoll.deploy import certs
    from atoll.secure.active import CertificatePKI
    from atoll.secure.he_keys import Decryptor
    from atoll.transport.grpc.he import DecryptorServer

    logging.getLogger("atoll").setLevel(logging.INFO)
    d = Path(args.certs)
    tls = {k: (d / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                 ("ca", "ca.pem"))}

    def identify(kind, value):
        reg = certs.load_registry(d)
        name = certs.by_certificate(reg, value) if kind == "cert" else certs.by_token(reg, value)
        return (name, name) if name else None  # an enrolled caller: the coordinator

    pki = None if args.client_ca is None else CertificatePKI(Path(args.client_ca).read_bytes())
    ledger = args.ledger or f"{args.key}.opened"
    server = DecryptorServer(Decryptor(args.key, args.min_clients, pki, ledger), identify,
                             address=f"{args.host}:{args.port}", tls=tls, auth=args.auth)
    mode = "signed inputs only" if pki else "one summed ciphertext per round"
    print(f"atoll he: decryptor ({mode}) listening on port {server.start()}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
