"""Homomorphic encryption in deployment against hostile inputs: the decryptor service refuses
unauthenticated callers, oversized and garbled sums, replays and small sums; the coordinator
fails the round cleanly (model unchanged, reason logged) when a decryptor is down or returns
garbage, and drops a client's garbled ciphertext with its reason."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")
pytest.importorskip("phe")

from atoll.deploy.he_rounds import Decryptors, read_request, request_bytes  # noqa: E402
from atoll.secure.he import HEError, HomomorphicSum, RemoteHolder  # noqa: E402
from atoll.secure.he_keys import Decryptor, load_public  # noqa: E402
from atoll.transport.grpc.client import TransportError  # noqa: E402
from atoll.transport.grpc.he import DecryptorChannel  # noqa: E402

from .he_helpers import deal, decryptors, finish, he_config, start  # noqa: E402
from .test_he import _initial, _lines  # noqa: E402


def _sum_of_two(pub, d=3):
    s = pub.scheme
    x = np.linspace(-0.5, 0.5, d)
    return s.dump(s.add(s.parse(s.encrypt(x), d), s.parse(s.encrypt(x), d)))


@pytest.fixture
def ckks_service(tmp_path):
    keys = deal(tmp_path, "ckks")
    servers, he = decryptors(tmp_path, keys["shares"])
    ch = DecryptorChannel(he["decryptors"][0], ca=open(he["ca"][0], "rb").read(),
                          token=open(he["token"][0]).read(), timeout=20)
    yield load_public(keys["public"]), servers[0], ch, he
    ch.close()
    servers[0].stop()


def test_decryptor_service_refuses_strangers_oversized_garbled_small_and_replayed_sums(ckks_service):
    pub, server, ch, he = ckks_service
    blob = _sum_of_two(pub)
    stranger = DecryptorChannel(he["decryptors"][0], ca=open(he["ca"][0], "rb").read(),
                                token="atl_not-enrolled", timeout=20)
    with pytest.raises(TransportError, match="UNAUTHENTICATED"):
        stranger.decrypt(1, 2, 3, blob, 24)
    stranger.close()
    big = b"\0" * (server.backend.max_bytes(3) + 1)
    with pytest.raises(TransportError, match="limit is"):
        ch.decrypt(1, 2, 3, big, 24)
    garbled = blob[:40] + bytes(len(blob) - 40)
    with pytest.raises(TransportError, match="does not load"):
        ch.decrypt(1, 2, 3, garbled, 24)
    with pytest.raises(TransportError, match=">= 2 updates"):
        ch.decrypt(1, 1, 3, blob, 24)
    assert server.backend.rounds == set()  # nothing above used up round 1
    out = np.frombuffer(ch.decrypt(1, 2, 3, blob, 24), "<f8")
    assert np.allclose(out, 2 * np.linspace(-0.5, 0.5, 3), rtol=0, atol=1e-8)
    with pytest.raises(TransportError, match="already decrypted round 1"):
        ch.decrypt(1, 2, 3, blob, 24)
    with pytest.raises(TransportError, match="DATA_LOSS"):  # a reply beyond what was asked
        ch.decrypt(2, 2, 3, blob, 16)


class _Garbage(Decryptor):
    """A decryptor that answers with well-sized garbage."""

    def decrypt(self, round_, count, d, blob):
        out = super().decrypt(round_, count, d, blob)
        return np.random.default_rng(0).integers(0, 256, len(out), dtype=np.uint8).tobytes()


@pytest.mark.parametrize("method,t", [("ckks", 1), ("paillier", 2)])
def test_a_decryptor_returning_garbage_is_detected_with_a_named_error(tmp_path, method, t):
    keys = deal(tmp_path, method, t)
    pub = load_public(keys["public"])
    parts = [_Garbage(keys["shares"][0])] + [Decryptor(p) for p in keys["shares"][1:]]
    calls = {f"dec{i}": (lambda r, c, d, b, m, run, x=x: x.decrypt(r, c, d, b)) for i, x in enumerate(parts)}
    st = HomomorphicSum(method, max_weight=10.0, key_bits=1024, decryptors=t).with_holder(
        RemoteHolder(pub.scheme, Decryptors(pub, calls)))
    like = {"w": torch.zeros(5, dtype=torch.float64)}
    inputs = {c: st.encode({"w": torch.full((5,), 0.1 * c, dtype=torch.float64)}, 5, c) for c in (1, 2)}
    want = "outside \\(0, 2\\]|not finite" if method == "ckks" else "do not combine|not a unit"
    with pytest.raises(HEError, match=want):
        st.aggregate(inputs, 1, like)


def test_a_request_is_read_only_within_its_size_and_fields():
    ok = request_bytes(2, 11, 3, "ab" * 32)
    assert read_request(ok) == {"round": 2, "d": 11, "cohort": 3, "fingerprint": "ab" * 32}
    for bad, why in [(b"{" * 600, "at most"), (b"\xff", "not JSON"),
                     (json.dumps({"round": 2}).encode(), "fields"),
                     (ok.replace(b'"d": 11', b'"d": "11"'), "'d' must be int")]:
        with pytest.raises(ValueError, match=why):
            read_request(bad)


def test_deployed_round_with_a_decryptor_down_fails_cleanly_and_keeps_the_model(tmp_path):
    cfg = he_config(tmp_path, "ckks", clients=3, rounds=1)
    keys = deal(tmp_path, "ckks")
    servers, he = decryptors(tmp_path, keys["shares"])
    servers[0].stop()  # the decryptor is down
    w0 = _initial(cfg)
    server, thread, parties, threads = start(cfg, tmp_path, {"public_key": keys["public"], **he},
                                             keys["public"])
    finish(server, thread, threads)
    for k, v in server.coordinator.state.params.items():
        assert torch.equal(v, w0[k]), k
    line = json.dumps(_lines(tmp_path)[0])
    assert "homomorphic sum failed" in line and "decryptor 127.0.0.1" in line
    assert all(not p.secure.refused for p in parties)  # the clients answered; the decryption failed


def test_deployed_garbled_and_oversized_ciphertexts_are_dropped_and_the_round_goes_on(tmp_path, monkeypatch):
    from atoll.deploy import client as C
    from atoll.deploy.he_client import HeParty

    class Hostile(HeParty):
        def answer(self, r, stage, data):
            out, s = super().answer(r, stage, data)
            return {0: b"\x01" * len(out), 1: out + b"\0" * (1 << 20)}.get(self.cid, out), s

    monkeypatch.setattr(C, "HeParty", Hostile)
    cfg = he_config(tmp_path, "ckks", clients=4, rounds=1)
    keys = deal(tmp_path, "ckks")
    servers, he = decryptors(tmp_path, keys["shares"])
    w0 = _initial(cfg)
    try:
        server, thread, parties, threads = start(cfg, tmp_path, {"public_key": keys["public"], **he},
                                                 keys["public"])
        finish(server, thread, threads)
    finally:
        servers[0].stop()
    line = _lines(tmp_path)[0]
    assert line["secure_survivors"] == 2
    why = {c: w for c, w in line["failures"]}
    assert "client 0's ciphertext dropped" in why[0] and "size limit" in why[1]
    assert any(not torch.equal(v, w0[k]) for k, v in server.coordinator.state.params.items())


def test_key_files_are_checked_before_they_are_parsed(tmp_path):
    """A key file is a file a party was handed: too large, not a key file, the wrong kind, a
    Paillier modulus that is not one, or a share with a field missing: each refused, naming it."""
    from atoll.secure.he_keys import MAX_FILE
    big = tmp_path / "big.key"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE + 1)  # sparse: nothing is written, and nothing must be read
    with pytest.raises(ValueError, match="larger than"):
        load_public(big)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"\x80\x04 pickle?\n" + os.urandom(64))
    with pytest.raises(ValueError, match="not an atoll public key file"):
        load_public(junk)
    keys = deal(tmp_path / "k", "paillier", 2, 1024)
    with pytest.raises(ValueError, match="not an atoll public key file"):
        load_public(keys["shares"][0])  # a share offered as the public key
    head, _, body = Path(keys["public"]).read_bytes().partition(b"\n")
    fields = json.loads(body)
    even = tmp_path / "even.key"
    even.write_bytes(head + b"\n" + json.dumps({**fields, "n": format(2 ** 1023, "x")}).encode())
    with pytest.raises(ValueError, match="not a 1024-bit Paillier modulus"):
        load_public(even)
    head, _, body = Path(keys["shares"][0]).read_bytes().partition(b"\n")
    fields = json.loads(body)
    del fields["share"]
    bad = tmp_path / "bad-share.key"
    bad.write_bytes(head + b"\n" + json.dumps(fields).encode())
    with pytest.raises(ValueError, match="bad-share.key.*share"):
        Decryptor(bad)
