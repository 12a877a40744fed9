"""Only enrolled clients get in: mutual TLS, tokens, revocation, no plaintext against TLS."""
import os
import stat

import pytest

from atoll.deploy import certs, status
from atoll.deploy.client import Client, credentials
from atoll.deploy.server import Server
from atoll.transport.grpc.client import Connection, TransportError

from .conftest import small_config


@pytest.fixture
def enrolment(tmp_path):
    d = certs.init(tmp_path / "certs")
    return d, {name: certs.issue(d, name, token=tok, observer=obs) for name, tok, obs in
               [("alice", False, False), ("bob", True, False), ("ops", True, True),
                ("ops-cert", False, True), ("mallory", False, False)]}


def serve(tmp_path, auth):
    cfg = small_config(tmp_path, clients=4)
    s = Server(cfg, run_dir=tmp_path / f"run-{auth}", certs_dir=tmp_path / "certs", host="localhost",
               port=0, auth=auth, plots=False)
    s.grpc.start()
    return s


def connect(s, **kw):
    return Connection(f"localhost:{s.port}", timeout=5, **credentials(**kw))


def test_files_are_private(enrolment):
    d, who = enrolment
    for path in [d / "ca.key", d / "server.key", d / "clients.json", who["alice"]["key"], who["bob"]["token"]]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert certs.load_registry(d)["bob"]["token_sha256"] not in open(who["bob"]["token"]).read()
    with pytest.raises(ValueError, match="already enrolled"):
        certs.issue(d, "alice")
    with pytest.raises(ValueError, match="client name"):
        certs.issue(d, "../evil")


def test_mutual_tls_admits_enrolled_certificates_only(tmp_path, enrolment):
    d, who = enrolment
    a = who["alice"]
    other = certs.init(tmp_path / "other")  # a different authority
    forged = certs.issue(other, "alice")
    certs.revoke(d, "mallory")
    s = serve(tmp_path, "mtls")
    try:
        assert connect(s, ca=a["ca"], cert=a["cert"], key=a["key"]).join()["client_id"] == 0
        with pytest.raises(TransportError):  # certificate from another CA: the handshake fails
            connect(s, ca=a["ca"], cert=forged["cert"], key=forged["key"]).join()
        with pytest.raises(TransportError):  # no client certificate at all
            connect(s, ca=a["ca"]).join()
        with pytest.raises(TransportError):  # a token is no substitute for the certificate
            connect(s, ca=a["ca"], token=who["bob"]["token"]).join()
        m = who["mallory"]
        with pytest.raises(TransportError) as e:  # valid CA signature, but revoked
            connect(s, ca=a["ca"], cert=m["cert"], key=m["key"]).join()
        assert e.value.code == "UNAUTHENTICATED" and not e.value.retryable
        with pytest.raises(TransportError) as e:  # the client API stops instead of retrying
            Client(f"localhost:{s.port}", tmp_path / "none.npz", ca=a["ca"], cert=m["cert"], key=m["key"]).run()
        assert e.value.code == "UNAUTHENTICATED"
        with pytest.raises(TransportError):  # plaintext against a TLS server
            connect(s, token=who["bob"]["token"], insecure=True).join()
        o = who["ops-cert"]
        with pytest.raises(TransportError) as e:
            connect(s, ca=a["ca"], cert=o["cert"], key=o["key"]).join()
        assert e.value.code == "PERMISSION_DENIED"
        st = status(f"localhost:{s.port}", ca=a["ca"], cert=o["cert"], key=o["key"])
        assert st["clients_enrolled"] == 2 and st["clients_connected"] == 1  # alice, bob; alice joined
    finally:
        s.grpc.stop(0)


def test_tokens(tmp_path, enrolment):
    d, who = enrolment
    ca = who["bob"]["ca"]
    s = serve(tmp_path, "token")
    try:
        assert connect(s, ca=ca, token=who["bob"]["token"]).join()["client_id"] == 1
        with pytest.raises(TransportError) as e:
            connect(s, ca=ca, token="atl_" + "x" * 43).join()
        assert e.value.code == "UNAUTHENTICATED"
        with pytest.raises(TransportError) as e:
            connect(s, ca=ca).join()
        assert e.value.code == "UNAUTHENTICATED"
        with pytest.raises(TransportError) as e:  # an observer may not train
            connect(s, ca=ca, token=who["ops"]["token"]).join()
        assert e.value.code == "PERMISSION_DENIED"
        assert status(f"localhost:{s.port}", ca=ca, token=who["ops"]["token"])["rounds"] == 3
        certs.revoke(d, "bob")  # takes effect at the next call, without a restart
        with pytest.raises(TransportError) as e:
            connect(s, ca=ca, token=who["bob"]["token"]).join()
        assert e.value.code == "UNAUTHENTICATED"
    finally:
        s.grpc.stop(0)


def test_insecure_server_still_admits_enrolled_tokens_only(tmp_path, enrolment, caplog):
    d, who = enrolment
    s = Server(small_config(tmp_path), run_dir=tmp_path / "run", certs_dir=d, host="localhost",
               port=0, insecure=True, plots=False)
    s.grpc.start()
    try:
        assert "INSECURE" in caplog.text
        assert connect(s, token=who["bob"]["token"], insecure=True).join()["client_id"] == 1
        with pytest.raises(TransportError) as e:
            connect(s, token="atl_nope", insecure=True).join()
        assert e.value.code == "UNAUTHENTICATED"
        with pytest.raises(TransportError):  # a TLS client does not talk to a plaintext server
            connect(s, ca=who["bob"]["ca"], token=who["bob"]["token"]).join()
    finally:
        s.grpc.stop(0)
