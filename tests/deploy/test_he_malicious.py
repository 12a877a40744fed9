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

from atoll.secure.he import HomomorphicSum  # noqa: E402
from atoll.secure.he_keys import load_public  # noqa: E402
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
    from atoll.secure.he import RemoteHolder
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
