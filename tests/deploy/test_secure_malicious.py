"""[secure] malicious = true in deployment: certificate-signed keys and the consistency check over
loopback gRPC give the simulated model bit for bit, survive dropouts at the new stage, and refuse
a server that swaps a client's keys and a token-enrolled client."""
import pytest
import torch

from atoll import config
from atoll.deploy import local
from atoll.deploy.server import Server
from atoll.deploy.secure_client import identity
from atoll.errors import ConfigError
from atoll.runtime.loop import LoopRuntime
from atoll.secure import active as A
from atoll.simulation import simulate

from .test_secure import droppers, expected_model, finish, lines, secure_config, start

MAL = "malicious = true\n"


@pytest.mark.parametrize("method,clients,extra", [("secagg", 4, ""), ("secagg+", 6, "neighbours = 4\n")])
def test_deployed_malicious_rounds_equal_the_simulated_ones(tmp_path, method, clients, extra):
    cfg = secure_config(tmp_path, method, clients, extra=MAL + extra)
    algorithm, model, data, plan = config.build(cfg)
    assert algorithm.secure.malicious
    sim = simulate(algorithm, model, data, plan, runtime=LoopRuntime(), plots=False)
    server, thread, parties, threads = start(cfg, tmp_path, tokens=False)
    finish(server, thread, threads)
    for k, v in sim.state.params.items():
        assert torch.equal(server.coordinator.state.params[k], v), k
    fan = clients - 1 if method == "secagg" else 4
    for line, want in zip(lines(tmp_path), sim.metrics):
        assert line["secure_stage_survivors"] == [clients] * 5 and "failures" not in line
        assert line["secure_survivors"] == want["secure_survivors"] == clients
        assert line["secure_stage_bytes_up"] == [1154, fan * 120, line["secure_bytes_up"], 64, fan * 49]
        assert line["secure_stage_bytes_down"][1] == fan * (4 + 1154)  # the signed advertisements
    assert all(p.counts["accepted"] == 2 and not p.secure.refused for p in parties)


@pytest.mark.parametrize("stage", [4, pytest.param(5, marks=pytest.mark.slow)])
def test_a_client_that_stops_at_the_consistency_check_or_after_leaves_the_exact_sum(tmp_path, stage):
    cfg = secure_config(tmp_path, "secagg", 5, rounds=1, extra=MAL, stage_timeout=1.5)
    server, thread, parties, threads = start(cfg, tmp_path, droppers({2: stage}), tokens=False)
    finish(server, thread, threads)
    line = lines(tmp_path)[0]
    assert line["secure_stage_survivors"] == [5] * (stage - 1) + [4] * (6 - stage)
    assert line["failures"] == [[2, f"secure stage {stage}: no answer within secure.stage_timeout = 1.5 s"]]
    assert line["secure_survivors"] == 5  # its masked input came before it stopped
    for k, v in expected_model(cfg, parties, [0, 1, 2, 3, 4]).items():
        assert torch.equal(server.coordinator.state.params[k], v), k


def test_a_server_that_swaps_a_clients_keys_is_refused_by_that_client(tmp_path, monkeypatch):
    forward = A.ActiveServer.collect_keys

    def swap(self, keys):  # the server's own keys in place of client 1's, toward client 0
        out = forward(self, keys)
        c_pk, s_pk, sig, cred = out[0][1]
        out[0][1] = (out[0][2][0], out[0][2][1], sig, cred)
        return out
    monkeypatch.setattr(A.ActiveServer, "collect_keys", swap)
    cfg = secure_config(tmp_path, "secagg", 5, rounds=1, extra=MAL + "threshold = 3\n", stage_timeout=5)
    server, thread, parties, threads = start(cfg, tmp_path, droppers({}), tokens=False)
    finish(server, thread, threads)
    assert parties[0].secure.refused == [
        "round 1: refused secure stage 2: SignatureError: client 0: refused: the keys advertised "
        "for client 1 are not signed by client 1's identity"]
    line = lines(tmp_path)[0]
    assert line["secure_stage_survivors"] == [5, 4, 4, 4, 4]  # the others go on without it
    assert line["failures"] == [[0, "secure stage 2: empty answer (the client refused the request)"]]
    assert not any(p.secure.refused for p in parties[1:])
    for k, v in expected_model(cfg, parties, [1, 2, 3, 4]).items():
        assert torch.equal(server.coordinator.state.params[k], v), k


def test_token_enrolled_clients_cannot_run_the_malicious_mode(tmp_path):
    cfg = secure_config(tmp_path, "secagg", 4, extra=MAL)
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    with pytest.raises(ConfigError, match="token-enrolled clients have none"):
        Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="127.0.0.1", port=0,
               auth="token", plots=False)
    algorithm = config.build(cfg)[0]
    with pytest.raises(ValueError, match="this client has none \\(token enrolment\\)"):
        identity(algorithm.secure, {"ca": open(enrolled[0]["ca"], "rb").read(), "cert": None,
                                    "key": None, "token": "x"})


def test_a_clients_policy_can_require_the_malicious_mode(tmp_path):
    """The server writes the config: without this policy it could run the semi-honest protocol."""
    from atoll.deploy import policy
    strict = policy.Guard(policy.load({"secure": {"malicious": True}}))
    for extra, ok in [("", False), (MAL, True)]:
        cfg = secure_config(tmp_path, "secagg", 4, extra=extra)
        algorithm, model, fed, plan = config.build(cfg)
        if ok:
            strict.built(cfg, plan, fed.clients[0].n, 0)
            continue
        with pytest.raises(policy.PolicyError, match="secure.malicious = False is not true"):
            strict.built(cfg, plan, fed.clients[0].n, 0)
