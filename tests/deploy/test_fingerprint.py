"""[watermark] fingerprint = true in deployment: each client receives its own copy, which traces
to it (p <= 1e-6) and to nobody else; the server's own model carries no client's code; a run
with copies trains like one without."""
import pytest
import torch

from atoll import config
from atoll import tree as T
from atoll import watermark as W
from atoll.deploy import local
from atoll.transport import wire

from .conftest import small_config
from .test_secure import finish, lines, start

MARK = '\n[watermark]\nenabled = true\nkey_file = "{key}"\nfingerprint = true\n'


def fingerprinted(tmp, extra="", rounds=2, clients=4):
    small_config(tmp, rounds=rounds, clients=clients)
    text = (tmp / "exp.toml").read_text() + MARK.format(key=tmp / "wm.key") + extra
    (tmp / "exp.toml").write_text(text.replace("hidden = [16]", "hidden = [64]"))
    return config.load(tmp / "exp.toml")


def test_each_client_gets_a_copy_that_traces_to_it_alone(tmp_path):
    from atoll.deploy.server import Server

    cfg = fingerprinted(tmp_path)
    local.prepare(cfg, tmp_path, tokens=True)
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="127.0.0.1",
                    port=0, auth="token", plots=False, linger_s=0.5)
    co = server.coordinator
    rnd = co._open()
    fp = W.fingerprints(W.load_key(tmp_path / "wm.key"), co.state.params, 4)  # what audit rebuilds
    copies = {}
    for cid in rnd.cohort:
        copies[cid] = T.split(wire.loads(rnd.tracked.task(cid)))["params"]
        t = W.trace(copies[cid], fp)
        assert t["client"] == cid and t["traced"] and t["p_value"] <= 1e-6, t
    assert len({float(v[fp.layer].sum()) for v in copies.values()}) == 4  # four different copies
    assert not W.trace(co.state.params, fp)["traced"]  # the server's model: nobody's code
    # a copy moves only the fingerprinted layer, and only a little
    for k, v in co.state.params.items():
        if k != fp.layer:
            assert all(torch.equal(c[k], v) for c in copies.values()), k
    rel = float((copies[0][fp.layer] - co.state.params[fp.layer]).norm() / co.state.params[fp.layer].norm())
    assert 0 < rel < 0.5
    server.grpc.stop()


@pytest.mark.parametrize("extra", ["", '[secure]\nmethod = "secagg"\nclip = 0.5\n'], ids=["plain", "secagg"])
def test_a_deployment_with_copies_trains_and_refuses_what_it_cannot_combine(tmp_path, extra):
    (tmp_path / "a").mkdir()
    cfg = fingerprinted(tmp_path / "a", extra=extra, rounds=3)
    server, thread, parties, threads = start(cfg, tmp_path / "a")
    finish(server, thread, threads)
    got = lines(tmp_path / "a")
    assert [ln["clients_succeeded"] for ln in got] == [4, 4, 4]
    if extra:  # the copies' updates went into the secure sum
        assert [ln["secure_survivors"] for ln in got] == [4, 4, 4]
    assert got[-1]["train_loss"] < got[0]["train_loss"]
    assert got[0]["bytes_down"] >= 4 * 0.9 * len(wire.dumps(server.coordinator.state.params))
    from atoll.deploy.server import Server

    for extra, words in [("", "needs watermark.enabled"),
                         ('[comm]\ndownlink = "client"\n', "choose one")]:
        (tmp_path / "b").mkdir(exist_ok=True)
        bad = fingerprinted(tmp_path / "b", extra=extra)
        if not extra:
            bad = bad.model_copy(update={"watermark": bad.watermark.model_copy(update={"enabled": False})})
        with pytest.raises(config.ConfigError, match=words):
            Server(bad, run_dir=tmp_path / "b" / "run", certs_dir=tmp_path / "a" / "certs",
                   host="127.0.0.1", port=0, auth="token", plots=False)
