"""[secure] method = "ckks" | "paillier" in deployment: the dealer's keys, decryptor services
over loopback gRPC, clients pinned to the public key. The model equals the simulated HE run's
(Paillier bit for bit; CKKS within 1e-8 of how far training moved each entry: 2.4e-9 to
5.1e-9 measured, the simulation's ~3e-9 per run and two independent encryption noises); a server that substitutes its own key is
refused by pinned clients."""
import dataclasses
import json
import os
import stat

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")
pytest.importorskip("phe")

from atoll import config  # noqa: E402
from atoll.deploy.he_client import HeParty  # noqa: E402
from atoll.deploy.he_rounds import request_bytes  # noqa: E402
from atoll.deploy.policy import Guard, PolicyError, load  # noqa: E402
from atoll.runtime.loop import LoopRuntime  # noqa: E402
from atoll.secure.he import HEError, HomomorphicSum  # noqa: E402
from atoll.secure.he_schemes import Ckks  # noqa: E402
from atoll.secure.he_keys import Decryptor, combine, load_public  # noqa: E402
from atoll.simulation import simulate  # noqa: E402

from .he_helpers import deal, decryptors, finish, he_config, start  # noqa: E402


def _lines(tmp):
    return [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def _initial(cfg):
    from atoll.client import params_of
    algorithm, model, _, _ = config.build(cfg)
    return {k: v.detach().clone() for k, v in algorithm.init(params_of(model)).params.items()}


def _simulated(cfg):
    algorithm, model, data, plan = config.build(cfg)
    if algorithm.secure.scheme == "paillier":  # exact sums: the key's size changes no bit
        algorithm = dataclasses.replace(algorithm, secure=dataclasses.replace(algorithm.secure, key_bits=1024))
    return simulate(algorithm, model, data, plan, runtime=LoopRuntime(), plots=False)


def _deployed(tmp, cfg, method, t=1, pin=None, keys=None):
    keys = keys or deal(tmp, method, t)
    servers, he = decryptors(tmp, keys["shares"])
    try:
        server, thread, parties, threads = start(cfg, tmp, {"public_key": keys["public"], **he},
                                                 pin or keys["public"])
        finish(server, thread, threads)
    finally:
        for s in servers:
            s.stop()
    return server, parties, servers


def test_keygen_writes_the_public_key_and_private_shares(tmp_path):
    out = deal(tmp_path, "paillier", 3)
    assert [p.name for p in out["shares"]] == ["share-1.key", "share-2.key", "share-3.key"]
    for p in out["shares"]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    pub = load_public(out["public"])
    assert (pub.method, pub.decryptors, len(pub.fingerprint)) == ("paillier", 3, 64)
    x = np.array([0.5, -0.25, 1.0])
    blob = pub.scheme.dump(pub.scheme.add(*(pub.scheme.parse(pub.scheme.encrypt(x), 3) for _ in "ab")))
    parts = {i: Decryptor(p).decrypt(1, 2, 3, blob) for i, p in enumerate(out["shares"])}
    assert np.array_equal(combine(pub.scheme, parts, 2, 3), 2 * x)  # all three shares open the sum
    with pytest.raises(ValueError, match="one key holder"):
        deal(tmp_path, "ckks", 2, name="ckks2")


def test_deployed_ckks_equals_the_simulated_he_run_within_1e8_of_the_update(tmp_path):
    cfg = he_config(tmp_path, "ckks", clients=4, rounds=2)
    w0, sim = _initial(cfg), _simulated(cfg)
    server, parties, servers = _deployed(tmp_path, cfg, "ckks")
    got = server.coordinator.state.params
    # CKKS adds fresh, unseeded encryption noise of about 2^10 / 2^45 per coordinate (scale
    # 2^SCALE_BITS): an absolute error whatever the entry's size, so the bound is 1e-8 of how far
    # training moved the entry plus 2^15 such units (2^-30, 9.3e-10). Seen: 1.9e-10 on an entry
    # that moved 0.019, just above the relative bound alone.
    ckks = 2.0 ** (15 - Ckks.SCALE_BITS)
    for k, v in sim.state.params.items():
        assert got[k].dtype == torch.float64
        moved = float((v - w0[k]).abs().max())
        assert float((got[k] - v).abs().max()) <= 1e-8 * moved + ckks, k
    lines = _lines(tmp_path)
    assert [ln["secure_survivors"] for ln in lines] == [4, 4]
    assert all(ln["secure_bytes_up"] > 100_000 for ln in lines)  # one CKKS ciphertext per client
    assert all(not p.secure.refused for p in parties)
    assert servers[0].backend.opened == {1, 2}  # one decryption per round


def test_deployed_threshold_paillier_equals_the_simulated_he_run_bit_for_bit(tmp_path):
    cfg = he_config(tmp_path, "paillier", clients=3, rounds=1, decryptors=2, hidden=2)
    sim = _simulated(cfg)
    server, parties, servers = _deployed(tmp_path, cfg, "paillier", t=2)
    got = server.coordinator.state.params
    for k, v in sim.state.params.items():
        assert torch.equal(got[k], v), k
    assert [s.backend.opened for s in servers] == [{1}, {1}]
    line, want = _lines(tmp_path)[0], sim.metrics[0]
    assert line["secure_survivors"] == 3 and "failures" not in line
    assert line["test_acc"] == want["test_acc"] and line["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12)


def test_attack_a_server_key_reads_a_client_that_takes_it_and_pinned_clients_refuse(tmp_path):
    """The attack first: a client that encrypts under the key its server names hands that
    server its update (the server holds the secret). A client pinned to the dealer's key
    refuses the same request; without a pin it refuses the run."""
    dealer, evil = deal(tmp_path, "ckks", name="dealer"), deal(tmp_path, "ckks", name="evil")
    stage = HomomorphicSum("ckks", max_weight=10.0)
    x = {"w": torch.tensor([0.125, -0.5, 0.25], dtype=torch.float64)}
    req = request_bytes(3, 4, 5, load_public(evil["public"]).fingerprint)

    def answer(pin):
        party = HeParty(stage, 0, 10, 2, pin)
        party.x, party.n, party.round, party.next = x, 10, 3, 1
        return party, party.answer(3, 1, req)[0]

    _, blob = answer(evil["public"])  # unpinned: it took the server's key
    opened = Decryptor(evil["shares"][0], min_clients=1).decrypt(9, 1, 4, blob)
    assert np.allclose(np.frombuffer(opened, "<f8"), [0.125, -0.5, 0.25, 1.0], rtol=0, atol=1e-9)
    party, blob = answer(dealer["public"])  # pinned to the dealer's key
    assert blob == b"" and "not the pinned key" in party.refused[0]
    cfg = he_config(tmp_path, "ckks")
    with pytest.raises(PolicyError, match="he_public_key"):
        Guard(load({})).built(cfg, None, 10, 0)


def test_deployed_server_with_a_substituted_key_learns_nothing_and_the_model_stays(tmp_path):
    cfg = he_config(tmp_path, "ckks", clients=3, rounds=1)
    dealer, evil = deal(tmp_path, "ckks", name="dealer"), deal(tmp_path, "ckks", name="evil")
    w0 = _initial(cfg)
    server, parties, servers = _deployed(tmp_path, cfg, "ckks", keys=evil, pin=dealer["public"])
    assert all("not the pinned key" in p.secure.refused[0] for p in parties)
    assert servers[0].backend.opened == set()  # the evil decryptor was never asked
    for k, v in server.coordinator.state.params.items():
        assert torch.equal(v, w0[k]), k
    assert "homomorphic sum failed" in json.dumps(_lines(tmp_path)[0])


def test_policy_require_accepts_a_homomorphic_sum_with_a_pinned_key_and_refuses_plaintext(tmp_path):
    keys = deal(tmp_path, "ckks")
    guard = Guard(load({"secure": {"require": True, "he_public_key": str(keys["public"])}}))
    cfg = he_config(tmp_path, "ckks")
    algorithm, _, data, plan = config.build(cfg)
    guard.built(cfg, plan, 50, 0)  # accepted: no PolicyError
    plain = cfg.model_copy(update={"secure": cfg.secure.model_copy(update={"method": "none"})})
    with pytest.raises(PolicyError, match="secure.require"):
        guard.built(plain, plan, 50, 0)


def test_cli_keygen_and_serve_a_decryptor(tmp_path, kill_on_exit):
    from atoll.deploy import certs
    from atoll.transport.grpc.he import DecryptorChannel

    from .conftest import atoll_process, listening_port

    keygen = atoll_process("he", "keygen", "--method", "paillier", "--decryptors", "1",
                           "--bits", "1024", "--out", tmp_path / "he", log=tmp_path / "keygen.log")
    assert keygen.wait(60) == 0, (tmp_path / "keygen.log").read_text()
    assert "fingerprint" in (tmp_path / "keygen.log").read_text()
    certs.init(tmp_path / "dec", force=True)
    e = certs.issue(tmp_path / "dec", "coordinator", token=True, observer=True)
    proc = atoll_process("he", "serve", "--key", tmp_path / "he" / "share-1.key", "--certs",
                         tmp_path / "dec", "--host", "127.0.0.1", "--port", "0", log=tmp_path / "dec.log")
    kill_on_exit(proc)
    port = listening_port(tmp_path / "dec.log")
    pub = load_public(tmp_path / "he" / "public.key")
    s = pub.scheme
    x = np.array([0.25, -0.75])
    blob = s.dump(s.add(s.parse(s.encrypt(x), 2), s.parse(s.encrypt(x), 2)))
    ch = DecryptorChannel(f"127.0.0.1:{port}", ca=open(e["ca"], "rb").read(),
                          token=open(e["token"]).read(), timeout=30)
    part = ch.decrypt(1, 2, 2, blob, len(blob))
    ch.close()
    assert np.array_equal(s.decode(s.combine([s.parse(part, 2)]), 2, 2), 2 * x)



@pytest.mark.slow
def test_cli_deployment_dealer_decryptor_server_and_pinned_clients_as_processes(tmp_path, kill_on_exit):
    """Every party its own process: keygen, he serve, atoll server --he-*, atoll client
    --he-public-key; two rounds, every client's updates accepted, the decryptor's log says it
    opened two sums."""
    from atoll.deploy import certs, local

    from .conftest import atoll_process, free_port, listening_port

    cfg = he_config(tmp_path, "ckks", clients=3, rounds=2)
    enrolled = local.prepare(cfg, tmp_path)
    assert atoll_process("he", "keygen", "--method", "ckks", "--out", tmp_path / "he",
                         log=tmp_path / "keygen.log").wait(60) == 0
    certs.init(tmp_path / "dec", force=True)
    e = certs.issue(tmp_path / "dec", "coordinator", token=True, observer=True)
    dec = atoll_process("he", "serve", "--key", tmp_path / "he" / "share-1.key", "--certs",
                        tmp_path / "dec", "--host", "127.0.0.1", "--port", "0", log=tmp_path / "dec.log")
    kill_on_exit(dec)
    port = free_port()
    server = atoll_process("server", tmp_path / "exp.toml", "--port", port, "--host", "localhost",
                           "--certs", tmp_path / "certs", "--out", tmp_path / "run", "--no-plots",
                           "--he-public-key", tmp_path / "he" / "public.key",
                           "--he-decryptor", f"127.0.0.1:{listening_port(tmp_path / 'dec.log')}",
                           "--he-ca", e["ca"], "--he-token", e["token"], log=tmp_path / "server.log")
    kill_on_exit(server)
    clients = []
    for c in enrolled:
        p = atoll_process("client", "--server", f"localhost:{port}", "--data", c["data"], "--cert",
                          c["cert"], "--he-public-key", tmp_path / "he" / "public.key",
                          "--require-secure", log=tmp_path / f"{c['name']}.log")
        kill_on_exit(p)
        clients.append(p)
    assert server.wait(120) == 0, (tmp_path / "server.log").read_text()
    for p, c in zip(clients, enrolled):
        assert p.wait(30) == 0, (tmp_path / f"{c['name']}.log").read_text()
        assert "2 updates accepted" in (tmp_path / f"{c['name']}.log").read_text()
    assert [ln["secure_survivors"] for ln in _lines(tmp_path)] == [3, 3]
    assert (tmp_path / "dec.log").read_text().count("decrypted the sum of 3 updates") == 2


def test_a_restarted_decryptor_remembers_the_rounds_it_opened(tmp_path):
    """Reopening a round after a restart would let a server difference two sums of the same
    round (e.g. {A, B} then {A, C}): the ledger keeps the opened rounds on disk."""
    out = deal(tmp_path, "paillier", 2)
    pub, ledger = load_public(out["public"]), tmp_path / "share-1.opened"
    x = np.array([0.5, -0.25, 1.0])
    blob = pub.scheme.dump(pub.scheme.add(*(pub.scheme.parse(pub.scheme.encrypt(x), 3) for _ in "ab")))
    Decryptor(out["shares"][0], ledger=ledger).decrypt(4, 2, 3, blob)
    again = Decryptor(out["shares"][0], ledger=ledger)  # the restart
    with pytest.raises(HEError, match="already decrypted round 4"):
        again.decrypt(4, 2, 3, blob)
    again.decrypt(5, 2, 3, blob)  # a new round opens
    assert ledger.read_text() == "- 4\n- 5\n"
    for bad in ("4\n", "- 4 5\n", "- x\n", "zz 4\n", "- 12345678901234567890\n"):
        ledger.write_text(bad)
        with pytest.raises(ValueError, match="ledger .*line 1"):
            Decryptor(out["shares"][0], ledger=ledger)
    ledger.write_bytes(b"- 1\n" * (2 << 20) + b"- 2\n")  # over the size bound: refused unread
    with pytest.raises(ValueError, match="ledger .*over"):
        Decryptor(out["shares"][0], ledger=ledger)
