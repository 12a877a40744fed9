"""[secure] malicious = true with ckks / paillier in deployment (loopback gRPC, certificate-
enrolled clients, decryptors started with the clients' CA): the model equals the simulated HE
run (Paillier bit for bit, CKKS within 1e-8 of how far training moved each entry), each
decryptor receives the signed inputs instead of one sum, a server that relabels a client's input
fails the round cleanly, a client's bad signature drops that client, and a client's policy can
require the mode."""
import json

import pytest
import torch

pytest.importorskip("tenseal")
pytest.importorskip("phe")

from atoll import config  # noqa: E402
from atoll.deploy import local  # noqa: E402
from atoll.deploy.he_rounds import Decryptors  # noqa: E402
from atoll.secure import he_signed as H  # noqa: E402

from .he_helpers import deal, decryptors, finish, he_config, start  # noqa: E402
from .test_he import _initial, _lines, _simulated  # noqa: E402

MAL = "malicious = true\n"


def _deploy_signed(tmp, cfg, method, t=1):
    keys = deal(tmp, method, t)
    enrolled = local.prepare(cfg, tmp)  # certificates: the clients sign with their keys
    servers, he = decryptors(tmp, keys["shares"], client_ca=tmp / "certs" / "ca.pem")
    try:
        server, thread, parties, threads = start(cfg, tmp, {"public_key": keys["public"], **he},
                                                 keys["public"], enrolled=enrolled)
        finish(server, thread, threads)
    finally:
        for s in servers:
            s.stop()
    return server, parties, servers


def test_deployed_malicious_paillier_equals_the_simulation_bit_for_bit(tmp_path):
    cfg = he_config(tmp_path, "paillier", clients=3, rounds=1, decryptors=2, hidden=2, extra=MAL)
    assert config.build(cfg)[0].secure.malicious
    sim = _simulated(cfg)
    server, parties, servers = _deploy_signed(tmp_path, cfg, "paillier", t=2)
    for k, v in sim.state.params.items():
        assert torch.equal(server.coordinator.state.params[k], v), k
    assert [s.backend.opened for s in servers] == [{1}, {1}]
    line = _lines(tmp_path)[0]
    assert line["secure_survivors"] == 3 and "failures" not in line
    per = line["secure_bytes_up"]  # each decryptor got the 3 signed inputs, not one sum
    assert 3 * per < line["secure_decryptor_bytes"] <= 3 * (per + H.OVERHEAD + 16) + 4


def test_deployed_malicious_ckks_equals_the_simulation_within_1e8_of_the_update(tmp_path):
    cfg = he_config(tmp_path, "ckks", clients=3, rounds=2, extra=MAL)
    w0, sim = _initial(cfg), _simulated(cfg)
    server, parties, servers = _deploy_signed(tmp_path, cfg, "ckks")
    got = server.coordinator.state.params
    for k, v in sim.state.params.items():
        moved = float((v - w0[k]).abs().max())
        assert float((got[k] - v).abs().max()) <= 1e-8 * moved, k
    assert [ln["secure_survivors"] for ln in _lines(tmp_path)] == [3, 3]
    assert servers[0].backend.opened == {1, 2}
    assert all(not p.secure.refused for p in parties)


def test_deployed_server_passing_one_clients_input_off_as_anothers_fails_the_round_cleanly(
        tmp_path, monkeypatch):
    """A malicious server forwards client 0's signed input twice (once as client 1): the
    decryptor refuses, the round fails with the reason, the model stays."""
    hold = Decryptors.hold

    def relabel(self, round_, run, signed):
        hold(self, round_, run, {**signed, 1: signed[0]})
    monkeypatch.setattr(Decryptors, "hold", relabel)
    cfg = he_config(tmp_path, "ckks", clients=3, rounds=1, extra=MAL)
    w0 = _initial(cfg)
    server, parties, servers = _deploy_signed(tmp_path, cfg, "ckks")
    for k, v in server.coordinator.state.params.items():
        assert torch.equal(v, w0[k]), k
    line = json.dumps(_lines(tmp_path)[0])
    assert "homomorphic sum failed" in line and "enrolled as client 0" in line
    assert servers[0].backend.opened == set()


def test_deployed_client_with_a_bad_signature_is_dropped_and_the_round_goes_on(tmp_path, monkeypatch):
    from atoll.deploy import client as C
    from atoll.deploy.he_client import HeParty

    class Hostile(HeParty):  # client 0 signs for another round: the server drops it
        def answer(self, r, stage, data):
            out, sec = super().answer(r, stage, data)
            ct, _, _ = H.unseal(out, 1 << 24)
            return (H.seal(self.identity, self.run, r + 7, self.cid, ct) if self.cid == 0 else out), sec
    monkeypatch.setattr(C, "HeParty", Hostile)
    cfg = he_config(tmp_path, "ckks", clients=4, rounds=1, extra=MAL)
    w0 = _initial(cfg)
    server, parties, servers = _deploy_signed(tmp_path, cfg, "ckks")
    line = _lines(tmp_path)[0]
    assert line["secure_survivors"] == 3
    assert "client 0's input is not signed by client 0 for round 1" in dict(line["failures"])[0]
    assert any(not torch.equal(v, w0[k]) for k, v in server.coordinator.state.params.items())


def test_a_clients_policy_can_require_the_malicious_mode_for_he(tmp_path):
    from atoll.deploy import policy
    keys = deal(tmp_path, "ckks")
    strict = policy.Guard(policy.load({"secure": {"malicious": True, "he_public_key": str(keys["public"])}}))
    for extra, ok in [("", False), (MAL, True)]:
        cfg = he_config(tmp_path, "ckks", extra=extra)
        _, _, fed, plan = config.build(cfg)
        if ok:
            strict.built(cfg, plan, fed.clients[0].n, 0)
            continue
        with pytest.raises(policy.PolicyError, match="secure.malicious = False is not true"):
            strict.built(cfg, plan, fed.clients[0].n, 0)


def test_malicious_he_needs_certificate_enrolment(tmp_path):
    from atoll.deploy.server import Server
    from atoll.errors import ConfigError
    cfg = he_config(tmp_path, "ckks", extra=MAL)
    local.prepare(cfg, tmp_path, tokens=True)
    with pytest.raises(ConfigError, match="token-enrolled clients have none"):
        Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="127.0.0.1",
               port=0, auth="token", plots=False)
