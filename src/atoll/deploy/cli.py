"""``atoll certs | server | client | status``: the deployment subcommands (docs/deployment.md)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def register(sub) -> None:
    certs = sub.add_parser("certs", help="private CA, server certificate, client enrolment",
                           description="Enrol a deployment: a private certificate authority, the "
                                       "server certificate, client certificates or tokens.")
    csub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = csub.add_parser("init", help="create the CA and the server certificate")
    init.add_argument("--dir", default="certs", help="folder for the files (default: certs)")
    init.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                      help="host name or IP the server is reached at (repeatable; "
                           "default: localhost and 127.0.0.1)")
    init.add_argument("--force", action="store_true", help="replace an existing authority")
    init.set_defaults(func=_certs_init)
    client = csub.add_parser("client", help="enrol a client: certificate (default) or token")
    client.add_argument("name")
    client.add_argument("--dir", default="certs")
    client.add_argument("--token", action="store_true", help="issue a bearer token, not a certificate")
    client.add_argument("--id", type=int, help="client index (default: the lowest free one)")
    client.add_argument("--observer", action="store_true",
                        help="may only ask for status (for operators); not a training client")
    client.set_defaults(func=_certs_client)
    revoke = csub.add_parser("revoke", help="remove a client from the registry (refused from now on)")
    revoke.add_argument("name")
    revoke.add_argument("--dir", default="certs")
    revoke.set_defaults(func=_certs_revoke)

    server = sub.add_parser("server", help="run the coordinator of a deployment",
                            description="Serve the experiment of CONFIG.toml to enrolled clients "
                                        "over gRPC (TLS by default) and write its run folder.")
    server.add_argument("config")
    server.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    server.add_argument("--port", type=int, help="listening port (default: deploy.port)")
    server.add_argument("--host", help="listening address (default: deploy.host)")
    server.add_argument("--certs", help="enrolment folder (default: deploy.certs)")
    server.add_argument("--out", help="run folder (default: OUT_DIR/NAME): new or empty, or this "
                        "run's folder (resumed); another run's folder is refused")
    server.add_argument("--overwrite", action="store_true",
                        help="replace whatever run the folder holds (its run files are removed)")
    server.add_argument("--insecure", action="store_true",
                        help="no TLS (local experiments only; clients authenticate with tokens)")
    server.add_argument("--no-plots", action="store_true", help="skip the plots at the end")
    he = server.add_argument_group("homomorphic encryption", "[secure] method = ckks | paillier "
                                   "(atoll he keygen / serve; docs/secure-aggregation.md)")
    he.add_argument("--he-public-key", metavar="FILE", help="the dealer's public.key")
    he.add_argument("--he-decryptor", action="append", default=[], metavar="HOST:PORT",
                    help="a decryptor (atoll he serve); one per share, all are needed")
    he.add_argument("--he-ca", action="append", default=[], metavar="FILE",
                    help="the decryptors' CA certificate (once for all, or once per decryptor)")
    he.add_argument("--he-token", action="append", default=[], metavar="FILE",
                    help="this server's token at the decryptors (once for all, or once each)")
    server.set_defaults(func=_server)

    cl = sub.add_parser("client", help="join a deployment and train on local data",
                        description="Connect out to a coordinator, pull tasks, train on local "
                                    "data and send encoded updates (never the data).")
    _connection_args(cl)
    cl.add_argument("--data", required=True, help=".npz file with x (N, F) and y (N,)")
    cl.add_argument("--state", help="client state file (default: DATA with suffix .state.pt)")
    _policy_args(cl)
    cl.set_defaults(func=_client)

    st = sub.add_parser("status", help="round, connected clients, last metrics of a coordinator")
    _connection_args(st, positional=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)


def _connection_args(p, positional: bool = False) -> None:
    if positional:
        p.add_argument("server", metavar="HOST:PORT")
    else:
        p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--ca", help="CA certificate (default: ca.pem next to --cert/--token, or its parent's)")
    p.add_argument("--cert", help="client certificate (mutual TLS); the key is --key or CERT with .key")
    p.add_argument("--key")
    p.add_argument("--token", help="enrolment token, or the file holding it")
    p.add_argument("--insecure", action="store_true", help="plaintext (only against an --insecure server)")


def _policy_args(p) -> None:
    g = p.add_argument_group("client policy", "what this client accepts from the server; a task "
                             "or config that weakens it stops the client (docs/deployment.md)")
    g.add_argument("--policy", metavar="FILE", help="policy TOML file; the flags below override it")
    g.add_argument("--privacy-mode", action="append", metavar="MODE",
                   help="an allowed privacy.mode: none, dp_sgd, dp_fedavg, local or intrinsic "
                        "(repeatable; default: any)")
    g.add_argument("--max-epsilon", type=float, help="most epsilon against the server in a run")
    g.add_argument("--delta", type=float, help="the delta of --max-epsilon (default 1e-5)")
    g.add_argument("--min-noise", type=float, metavar="Z", help="smallest noise multiplier")
    g.add_argument("--min-batch-size", type=int, help="smallest (expected) batch size")
    g.add_argument("--min-steps", type=int, help="fewest local steps per task")
    g.add_argument("--allow-model", action="append", default=[], metavar="NAME",
                   help="a model the server may name, e.g. mypkg.nets:Net (repeatable; the zoo "
                        "models logreg, mlp, cnn are allowed unless the policy file says otherwise)")
    g.add_argument("--max-task-mb", type=float, help="largest task download (default 256)")
    g.add_argument("--require-secure", action="store_true", default=None,
                   help="refuse a run whose updates do not go into a secure sum")
    g.add_argument("--min-cohort", type=int, help="fewest clients in a secure sum (default 2)")
    g.add_argument("--he-public-key", metavar="FILE", help="the dealer's public.key this client "
                   "pins (needed for secure.method = ckks | paillier; never taken from the server)")
    g.add_argument("--require-malicious", action="store_true", default=None,
                   help="refuse a secure sum that is not [secure] malicious = true")


def _policy(args):
    from atoll.deploy import policy

    base = policy.load(args.policy)
    allow = base.models.allow + [m for m in args.allow_model if m not in base.models.allow]
    return policy.load(base, {
        "privacy.modes": args.privacy_mode, "privacy.max_epsilon": args.max_epsilon,
        "privacy.delta": args.delta, "privacy.min_noise_multiplier": args.min_noise,
        "training.min_batch_size": args.min_batch_size, "training.min_steps": args.min_steps,
        "models.allow": allow, "limits.max_task_mb": args.max_task_mb,
        "secure.require": args.require_secure, "secure.min_cohort": args.min_cohort,
        "secure.he_public_key": args.he_public_key,
        "secure.malicious": args.require_malicious})


def _credentials(args) -> dict:
    if not args.cert and not args.token:
        raise ValueError("give --cert (mutual TLS) or --token")
    key = args.key or (str(Path(args.cert).with_suffix(".key")) if args.cert else None)
    ca = args.ca
    if ca is None and not args.insecure:
        near = Path(args.cert or args.token).resolve().parent
        ca = next((str(p) for p in (near / "ca.pem", near.parent / "ca.pem") if p.is_file()), None)
        if ca is None:
            raise ValueError("no --ca given and no ca.pem found next to the certificate or token")
    return {"ca": ca, "cert": args.cert, "key": key if args.cert else None, "token": args.token,
            "insecure": args.insecure}


def _timestamped_logs() -> None:
    logging.getLogger("atoll").setLevel(os.environ.get("ATOLL_LOG", "INFO"))
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def _certs_init(args) -> int:
    from atoll.deploy import certs

    d = certs.init(args.dir, args.host or ["localhost", "127.0.0.1"], force=args.force)
    print(f"wrote {d}/ca.pem, ca.key (keep private), server.pem, server.key, clients.json")
    return 0


def _certs_client(args) -> int:
    from atoll.deploy import certs

    e = certs.issue(args.dir, args.name, token=args.token, client_id=args.id, observer=args.observer)
    role = "observer" if e["id"] is None else f"client id {e['id']}"
    files = ", ".join(e[k] for k in ("cert", "key", "token") if k in e)
    print(f"enrolled {e['name']} ({role}): give it {files} and {e['ca']}")
    return 0


def _certs_revoke(args) -> int:
    from atoll.deploy import certs

    certs.revoke(args.dir, args.name)
    print(f"revoked {args.name}: the server refuses it from its next call")
    return 0


def _server(args) -> int:
    from atoll import config
    from atoll.deploy.server import Server

    _timestamped_logs()
    cfg = config.load(args.config, args.set)
    server = Server(cfg, run_dir=args.out, insecure=args.insecure, port=args.port, host=args.host,
                    certs_dir=args.certs, plots=not args.no_plots, overwrite=args.overwrite,
                    he={"public_key": args.he_public_key, "decryptors": args.he_decryptor,
                        "ca": args.he_ca or [None], "token": args.he_token or [None]})
    print(f"atoll server: {cfg.name} listening on port {server.port} "
          f"({'INSECURE' if args.insecure else 'TLS, ' + (cfg.deploy.auth)}); "
          f"run folder {server.coordinator.run_dir}", flush=True)
    final = server.run()
    if final:
        print(f"done: {final['rounds']} rounds, test accuracy {final['test_acc']:.2%}")
    return 0


def _client(args) -> int:
    from atoll.deploy.client import Client

    _timestamped_logs()
    state = args.state or str(Path(args.data).with_suffix(".state.pt"))
    client = Client(args.server, args.data, state_path=state, policy=_policy(args),
                    **_credentials(args))
    counts = _refused_is_error(client.run, args.server)
    print(f"done: {counts['accepted']} updates accepted, {counts['rejected']} not, "
          f"{counts['reconnects']} reconnects")
    return 0


def _status(args) -> int:
    from atoll.deploy import status

    s = _refused_is_error(lambda: status(args.server, **_credentials(args)), args.server)
    if args.json:
        print(json.dumps(s))
        return 0
    m = s["last_metrics"]
    acc = f", test accuracy {m['test_acc']:.2%}" if "test_acc" in m else ""
    print(f"{s['phase']}: round {s['round']}/{s['rounds']}, {s['clients_connected']} of "
          f"{s['clients_enrolled']} clients connected, {s['answered']}/{s['sampled']} answered "
          f"this round{acc}", file=sys.stdout)
    return 0


def _refused_is_error(fn, server: str):
    from atoll.transport.grpc.client import TransportError

    try:
        return fn()
    except TransportError as exc:
        raise ValueError(f"{server}: {exc}") from None
