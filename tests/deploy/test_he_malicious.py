"""Homomorphic encryption against a malicious server (``[secure] malicious = true``).

The attack first: a decryptor that is sent ONE summed ciphertext and the server's word for how
many updates it holds opens whatever the server sends. A server that forwards one client's
ciphertext (count claimed 2) reads that client's update: CKKS (the one key holder's plaintext
comes back to the server) and threshold Paillier (both partial decryptions come back to the
server, which combines them). Decryptors started with the clients' CA (``he serve
--client-ca``) open only inputs each signed by an enrolled client, and refuse the attack."""
import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")
pytest.importorskip("phe")

from atoll.deploy import certs  # noqa: E402
from atoll.secure import active as A  # noqa: E402
from atoll.secure import he_signed as H  # noqa: E402
from atoll.secure.he import HomomorphicSum, RemoteHolder  # noqa: E402
from atoll.secure.he_keys import load_public  # noqa: E402
from atoll.transport.grpc.client import TransportError  # noqa: E402
from atoll.transport.grpc.he import DecryptorChannel  # noqa: E402

from .he_helpers import deal, decryptors  # noqa: E402

X = torch.tensor([0.125, -0.5, 0.25, 0.0625], dtype=torch.float64)  # the victim's update


def _channels(he):
    return [DecryptorChannel(a, ca=open(c, "rb").read(), token=open(t).read(), timeout=20)
            for a, c, t in zip(he["decryptors"], he["ca"], he["token"])]


@pytest.mark.parametrize("method,t", [("ckks", 1), ("paillier", 2)])
def test_attack_a_server_reads_one_clients_update_from_semi_honest_decryptors(tmp_path, method, t):
    """The hole without ``malicious = true``: one client's ciphertext sent as a 'sum of 2'."""
    keys = deal(tmp_path, method, t)
    pub = load_public(keys["public"])
    stage = HomomorphicSum(method, max_weight=10.0, key_bits=1024, decryptors=t)
    victim = stage.with_holder(RemoteHolder(pub.scheme)).encode({"w": X}, 5, 0)  # w = 0.5
    servers, he = decryptors(tmp_path, keys["shares"])
    chans = _channels(he)
    try:
        d = len(X) + 1
        replies = [ch.decrypt(1, 2, d, victim, len(victim) + 8 * d) for ch in chans]
    finally:
        for ch in chans:
            ch.close()
        for s in servers:
            s.stop()
    s = pub.scheme
    if method == "ckks":
        got = np.frombuffer(replies[0], "<f8")
    else:  # the server combines the partial decryptions of ONE ciphertext (count 1)
        got = s.decode(s.combine([s.parse(r, d) for r in replies]), 1, d)
    read = got[:-1] / got[-1]  # the victim's update, divided by its weight
    if method == "paillier":
        assert np.array_equal(read, X.numpy())  # bit for bit
    else:
        assert np.allclose(read, X.numpy(), rtol=0, atol=1e-8)


# ---- the defence: decryptors that open only signed inputs ------------------------------------

RUN = b"0123456789abcdef"


def _enrol(tmp, n=3, name="certs"):
    """A deployment's CA with clients 0..n-1 enrolled by certificate: (ca path, identities)."""
    certs.init(tmp / name, force=True)
    ids = []
    for i in range(n):
        e = certs.issue(tmp / name, f"client-{i}", client_id=i)
        ids.append(A.Identity.enrolled(open(e["cert"], "rb").read(), open(e["key"], "rb").read()))
    return tmp / name / "ca.pem", ids


class _Signed:
    """Clients' signed inputs for the tests: ``inp(cid, round)`` -> (ct, sig, cert)."""

    def __init__(self, tmp, method, t=1):
        self.keys = deal(tmp, method, t)
        self.pub = load_public(self.keys["public"])
        self.ca, self.ids = _enrol(tmp)
        self.stage = HomomorphicSum(method, max_weight=10.0, key_bits=1024, decryptors=t).with_holder(
            RemoteHolder(self.pub.scheme))
        self.cts = {c: self.stage.encode({"w": X * (c + 1)}, 5, 0) for c in range(3)}
        self.d = len(X) + 1

    def inp(self, cid, round_=1, run=RUN, ct=None):
        raw = H.seal(self.ids[cid], run, round_, cid, ct or self.cts[cid])
        return H.unseal(raw, 1 << 24)


@pytest.fixture
def signed_service(tmp_path):
    s = _Signed(tmp_path, "ckks")
    servers, he = decryptors(tmp_path, s.keys["shares"], client_ca=s.ca)
    (ch,) = _channels(he)
    yield s, servers[0], ch
    ch.close()
    servers[0].stop()


@pytest.mark.parametrize("method,t", [("ckks", 1), ("paillier", 2)])
def test_the_attack_is_refused_by_decryptors_that_open_only_signed_inputs(tmp_path, method, t):
    """The same attack against decryptors with the clients' CA: the summed ciphertext is refused
    outright, and the victim's signed input passed off as a sum of 2 is refused too."""
    s = _Signed(tmp_path, method, t)
    servers, he = decryptors(tmp_path, s.keys["shares"], client_ca=s.ca)
    chans = _channels(he)
    try:
        for ch in chans:
            with pytest.raises(TransportError, match="opens only signed inputs"):
                ch.decrypt(1, 2, s.d, s.cts[0], 1 << 20)
            one = H.bundle({0: s.inp(0)})
            with pytest.raises(TransportError, match="does not hold the 2 inputs announced"):
                ch.decrypt(1, 2, s.d, one, 1 << 20, run=RUN)
            with pytest.raises(TransportError, match="limit is 0"):  # 1 < min_clients: not read
                ch.decrypt(1, 1, s.d, one, 1 << 20, run=RUN)
        assert [x.backend.opened for x in servers] == [set()] * t  # nothing was opened
    finally:
        for ch in chans:
            ch.close()
        for x in servers:
            x.stop()


def test_signed_decryptor_opens_the_sum_of_distinct_signed_clients_once(signed_service):
    s, server, ch = signed_service
    raw = ch.decrypt(1, 2, s.d, H.bundle({0: s.inp(0), 2: s.inp(2)}), 1 << 20, run=RUN)
    got = np.frombuffer(raw, "<f8")
    want = 0.5 * np.append(X.numpy() * 1 + X.numpy() * 3, 2.0)  # w = 0.5 each
    assert np.allclose(got, want, rtol=0, atol=1e-8)
    assert server.backend.opened == {1}
    with pytest.raises(TransportError, match="already decrypted round 1"):
        ch.decrypt(1, 2, s.d, H.bundle({0: s.inp(0), 1: s.inp(1)}), 1 << 20, run=RUN)


def test_signed_decryptor_refuses_duplicated_forged_replayed_and_unsigned_inputs(signed_service, tmp_path):
    s, server, ch = signed_service
    ct0, sig0, cert0 = s.inp(0)
    own = s.stage.encode({"w": X * 0}, 5, 0)  # the server's own encryption (it has the public key)
    _, other_ids = _enrol(tmp_path, 2, name="rogue")  # a CA the decryptor does not trust
    rogue = H.unseal(H.seal(other_ids[1], RUN, 1, 1, own), 1 << 24)
    cases = [
        ({0: s.inp(0), 1: (ct0, sig0, cert0)}, "enrolled as client 0"),       # 0's input as client 1
        ({0: s.inp(0), 1: (own, sig0, s.inp(1)[2])}, "not signed by client 1"),  # own ct, 1's cert
        ({0: s.inp(0), 1: (own, b"\0" * 64, s.inp(1)[2])}, "not signed by client 1"),
        ({0: s.inp(0), 1: rogue}, "not one this deployment's CA signed"),      # a sybil elsewhere
        ({0: s.inp(0, round_=0), 1: s.inp(1, round_=0)}, "for round 1"),      # last round's inputs
        ({0: s.inp(0, run=b"another-run"), 1: s.inp(1, run=b"another-run")}, "not signed"),
    ]
    for inputs, why in cases:
        with pytest.raises(TransportError, match=why):
            ch.decrypt(1, 2, s.d, H.bundle(inputs), 1 << 20, run=RUN)
    dup = H.bundle({0: s.inp(0)})[4:] * 2  # client 0 twice
    with pytest.raises(TransportError, match="client 0 appears twice"):
        ch.decrypt(1, 2, s.d, b"\2\0\0\0" + dup, 1 << 20, run=RUN)
    assert server.backend.opened == set()  # nothing above used up round 1
    ch.decrypt(1, 2, s.d, H.bundle({0: s.inp(0), 1: s.inp(1)}), 1 << 20, run=RUN)
    assert server.backend.opened == {1}


def test_signed_inputs_are_read_only_within_their_sizes(signed_service):
    """Hostile framing: oversized, truncated, trailing bytes, a wrong count, an oversized part;
    each refused with its reason before a ciphertext is parsed."""
    s, server, ch = signed_service
    good = H.bundle({0: s.inp(0), 1: s.inp(1)})
    limit = server.backend.max_signed(s.d, 2)
    assert limit == H.max_bundle(2, server.backend.max_bytes(s.d))
    with pytest.raises(TransportError, match="limit is"):
        ch.decrypt(1, 2, s.d, good + b"\0" * (limit + 1 - len(good)), 1 << 20, run=RUN)
    with pytest.raises(TransportError, match="limit is 0"):  # over MAX_INPUTS: not read
        ch.decrypt(1, H.MAX_INPUTS + 1, s.d, good, 1 << 20, run=RUN)
    for bad, why in [(good[:-1], "its header announces"), (good + b"\0", "1 bytes after"),
                     (good[:4 + 16 + 10], "its header announces"),
                     (b"\3" + good[1:], "does not hold the 2 inputs")]:
        with pytest.raises(TransportError, match=why):
            ch.decrypt(1, 2, s.d, bad, 1 << 20, run=RUN)
    huge = good[:4] + good[4:12] + (1 << 30).to_bytes(4, "little") + good[16:]
    with pytest.raises(TransportError, match="a ciphertext of 1073741824 bytes"):
        ch.decrypt(1, 2, s.d, huge, 1 << 20, run=RUN)
    answer = H.seal(s.ids[0], RUN, 1, 0, s.cts[0])  # a client's answer, as the server reads it
    ct, sig, cert = H.unseal(answer, len(s.cts[0]))
    assert (ct, len(sig), cert) == (s.cts[0], 64, s.ids[0].credential)
    for bad, why in [(answer[:4], "a signed input of 4 bytes"), (answer[:-1], "its header announces"),
                     (answer, "a ciphertext of")]:
        with pytest.raises(H.SignedInputError, match=why):
            H.unseal(bad, len(s.cts[0]) - (why == "a ciphertext of"))
    with pytest.raises(H.SignedInputError, match="a certificate of 5000 bytes"):
        H.unseal(b"\1\0\0\0" + (5000).to_bytes(4, "little") + b"\0" * 6000, 1 << 20)
    with pytest.raises(H.SignedInputError, match="run id of 65 bytes"):
        H.input_message(b"r" * 65, 1, 0, b"")
    assert server.backend.opened == set()


def test_a_semi_honest_decryptor_refuses_signed_inputs_by_name(tmp_path):
    s = _Signed(tmp_path, "ckks")
    servers, he = decryptors(tmp_path, s.keys["shares"])
    (ch,) = _channels(he)
    try:
        with pytest.raises(TransportError, match="has no client CA"):
            ch.decrypt(1, 2, s.d, H.bundle({0: s.inp(0), 1: s.inp(1)}), 1 << 20, run=RUN)
    finally:
        ch.close()
        servers[0].stop()


def test_cli_serve_with_client_ca_opens_only_signed_inputs(tmp_path, kill_on_exit):
    from .conftest import atoll_process, listening_port

    s = _Signed(tmp_path, "paillier")
    certs.init(tmp_path / "dec", force=True)
    e = certs.issue(tmp_path / "dec", "coordinator", token=True, observer=True)
    proc = atoll_process("he", "serve", "--key", s.keys["shares"][0], "--certs", tmp_path / "dec",
                         "--client-ca", s.ca, "--host", "127.0.0.1", "--port", "0",
                         log=tmp_path / "dec.log")
    kill_on_exit(proc)
    port = listening_port(tmp_path / "dec.log")
    assert "signed inputs only" in (tmp_path / "dec.log").read_text()
    ch = DecryptorChannel(f"127.0.0.1:{port}", ca=open(e["ca"], "rb").read(),
                          token=open(e["token"]).read(), timeout=30)
    try:
        p = s.pub.scheme
        summed = p.dump(p.add(p.parse(s.cts[0], s.d), p.parse(s.cts[1], s.d)))
        with pytest.raises(TransportError, match="opens only signed inputs"):
            ch.decrypt(1, 2, s.d, summed, len(summed))
        part = ch.decrypt(1, 2, s.d, H.bundle({0: s.inp(0), 1: s.inp(1)}), len(summed), run=RUN)
    finally:
        ch.close()
    got = p.decode(p.combine([p.parse(part, s.d)]), 2, s.d)
    assert np.array_equal(got, 0.5 * np.append(X.numpy() * 3, 2.0))  # 0.5 (x + 2x), weights 0.5
