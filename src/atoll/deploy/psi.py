"""``atoll psi serve`` / ``atoll psi connect``: private set intersection between two parties.

Ids come from a text file, one per line (blank lines skipped). The listening party admits
parties enrolled with ``atoll certs`` (token or certificate), like the deployment server. Each
side prints one JSON line (what it learned, the sizes, the payload bytes, the seconds) and, when
it learned the intersection and ``--out`` is given, writes its ids in it, one per line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from atoll.deploy import certs

LEARN = ("nothing", "size", "intersection")


def listen_args(p) -> None:
    """The listening party's options (``psi serve``, ``vertical serve``)."""
    p.add_argument("--certs", default="certs", help="enrolment folder (default: certs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="default: any free port (printed)")
    p.add_argument("--auth", default="token", choices=["token", "mtls"])


def dial_args(p) -> None:
    """The dialling party's credentials (``psi connect``, ``vertical connect``)."""
    p.add_argument("--ca", required=True, help="the authority's certificate (ca.pem)")
    p.add_argument("--token-file", help="bearer token file (from `atoll certs client --token`)")
    p.add_argument("--cert", help="client certificate (mutual TLS)")
    p.add_argument("--key", help="client key (mutual TLS)")


def dial_creds(args) -> dict:
    """The credentials ``dial_args`` named: the CA, and a token or a certificate and its key."""
    creds = {"ca": Path(args.ca).read_bytes()}
    if args.token_file:
        creds["token"] = Path(args.token_file).read_text().strip()
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise ValueError("give both --cert and --key, or neither")
        creds["cert"], creds["key"] = Path(args.cert).read_bytes(), Path(args.key).read_bytes()
    return creds


def register(sub) -> None:
    psi = sub.add_parser("psi", help="private set intersection (ECDH-PSI) with another party",
                         description="Find the ids two parties share without revealing the others "
                                     "(docs/vertical.md).")
    psub = psi.add_subparsers(dest="psi_command", required=True, metavar="ACTION")
    serve = psub.add_parser("serve", help="listen for the other party")
    serve.add_argument("ids", help="text file, one id per line")
    listen_args(serve)
    serve.add_argument("--sessions", type=int, default=1, help="sessions to serve, then exit")
    connect = psub.add_parser("connect", help="dial the listening party")
    connect.add_argument("address", help="HOST:PORT")
    connect.add_argument("ids", help="text file, one id per line")
    dial_args(connect)
    for p in (serve, connect):
        p.add_argument("--learn", default="intersection", choices=LEARN,
                       help="the most this party asks to learn")
        p.add_argument("--reveal", default="intersection", choices=LEARN,
                       help="the most this party lets the other learn")
        p.add_argument("--workers", type=int, default=1, help="processes for the crypto")
        p.add_argument("--timeout", type=float, default=60.0, help="s the peer may stay silent")
        p.add_argument("--out", help="write the intersection here, one id per line")
    serve.set_defaults(func=_serve)
    connect.set_defaults(func=_connect)


def read_ids(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ids file {p} not found")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _options(args) -> dict:
    return {"learn": args.learn, "reveal": args.reveal, "workers": args.workers,
            "timeout": args.timeout}


def _report(args, res) -> None:
    print(json.dumps({"learned": res.learned, "size": res.size, "peer_count": res.peer_count,
                      "bytes_sent": res.bytes_sent, "bytes_received": res.bytes_received,
                      "seconds": round(res.seconds.get("total", 0.0), 3)}), flush=True)
    if args.out and res.intersection is not None:
        tmp = Path(args.out + ".tmp")
        tmp.write_text("".join(f"{x}\n" for x in res.intersection), encoding="utf-8")
        os.replace(tmp, args.out)


def _serve(args) -> int:
    from atoll.transport.grpc.psi import PsiServer
    ids, d = read_ids(args.ids), Path(args.certs)
    tls = {k: (d / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                 ("ca", "ca.pem"))}

    def identify(kind, value):
        reg = certs.load_registry(d)
        name = certs.by_certificate(reg, value) if kind == "cert" else certs.by_token(reg, value)
        return (name, name) if name else None  # any enrolled party; one session at a time each

    server = PsiServer(ids, identify, address=f"{args.host}:{args.port}", tls=tls,
                       auth=args.auth, **_options(args))
    print(f"atoll psi: listening on port {server.start()}", flush=True)
    try:
        server.wait(args.sessions, timeout=24 * 3600)
    finally:
        server.stop()
    for name, exc in server.errors:
        print(f"atoll psi: session with {name} failed: {exc}", flush=True)
    for _, res in server.results:
        _report(args, res)
    return 1 if server.errors else 0


def _connect(args) -> int:
    from atoll.transport.grpc.psi import psi_connect
    from atoll.vertical.psi import PsiError
    creds = dial_creds(args)
    try:
        res = psi_connect(args.address, read_ids(args.ids), creds=creds, **_options(args))
    except PsiError as exc:
        print(f"atoll psi connect: error: {exc}", flush=True)
        return 1
    _report(args, res)
    return 0
