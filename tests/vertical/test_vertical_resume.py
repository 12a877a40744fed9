"""Resume of a deployed vertical run (``atoll vertical serve|connect --run-dir DIR --resume``):
each party checkpoints its own state after every epoch; killed (SIGKILL) and restarted, the run
ends with the uninterrupted run's losses and models, bit for bit (float64). A bogus epoch, another
run's or a damaged checkpoint is refused, named."""
import json
import signal
import time

import pytest
import torch

from atoll.cli import main
from atoll.deploy import vertical
from atoll.vertical import resume
from atoll.vertical.channel import Channel, PartyError
from test_vertical_cli import port, setup, start


def party(tmp, run_dir=None, **change):
    return vertical.FeatureEndpoint(vertical.load(tmp / "tel.toml") | change, run_dir)


def label(tmp):
    cfg = vertical.load(tmp / "bank.toml")
    return (cfg, *vertical.table(cfg))


def train(tmp, tel, bank_dir=None, stop_at=None, **kw):
    """The label party's run with ``tel`` on a local channel; the telecom vanishes at step ``stop_at``."""
    cfg, x, y, digest = label(tmp)
    channel = Channel()
    channel.attach("telecom", tel)
    if stop_at is not None:
        inner, calls = tel.on, {"n": 0}

        def on(name, msg, sender):
            calls["n"] += name == "rows"
            if calls["n"] > stop_at:
                raise PartyError("gone")
            return inner(name, msg, sender)
        tel.on = on
    ck = vertical.last_checkpoint(cfg, bank_dir, x, digest) if bank_dir else None
    return vertical.train(cfg, channel, x, y, digest, run_dir=bank_dir, ck=ck, **kw)


def dirs(tmp):
    return vertical.run_folder(tmp / "bank_run", True), vertical.run_folder(tmp / "tel_run", True)


@pytest.mark.parametrize("stop_at", [6, 9])  # mid-epoch 2; the first step of epoch 3
def test_a_stopped_run_resumes_to_the_uninterrupted_losses_and_models(tmp_path, stop_at):
    setup(tmp_path, epochs=4)  # 4 steps an epoch
    whole_tel = party(tmp_path)
    whole = train(tmp_path, whole_tel)
    bank_dir, tel_dir = dirs(tmp_path)
    cut = train(tmp_path, party(tmp_path, tel_dir), bank_dir, stop_at=stop_at)
    assert "error" in cut and cut["steps"] == stop_at
    assert resume.held(bank_dir) == [1, 2][: (stop_at // 4)] and resume.held(tel_dir) == resume.held(bank_dir)
    tel = party(tmp_path, tel_dir)
    done = train(tmp_path, tel, bank_dir)
    assert "error" not in done and done["resumed_from_epoch"] == stop_at // 4
    assert done["losses"] == whole["losses"] and len(done["losses"]) == 16  # float64, exactly
    assert done["auc"] == whole["auc"] and done["bytes_per_step"] == whole["bytes_per_step"]
    assert all(torch.equal(done["state"][k], v) for k, v in whole["state"].items())
    assert all(torch.equal(tel.state()[k], v) for k, v in whole_tel.state().items())
    assert resume.held(bank_dir) == resume.held(tel_dir) == [3, 4]


def test_the_label_party_resumes_from_the_epoch_both_hold(tmp_path):
    """Killed between the telecom's checkpoint of an epoch and its own: the telecom holds epochs
    1 and 2, the bank 1; the run resumes from epoch 1 (the latest the bank holds)."""
    setup(tmp_path, epochs=3)
    whole = train(tmp_path, party(tmp_path))
    bank_dir, tel_dir = dirs(tmp_path)
    train(tmp_path, party(tmp_path, tel_dir), bank_dir, stop_at=9)
    (bank_dir / "checkpoint-2.pt").unlink()
    assert resume.held(bank_dir) == [1] and resume.held(tel_dir) == [1, 2]
    done = train(tmp_path, party(tmp_path, tel_dir), bank_dir)
    assert done["resumed_from_epoch"] == 1 and done["losses"] == whole["losses"]
    assert resume.held(bank_dir) == resume.held(tel_dir) == [2, 3]


def hello(tmp, run=None, epoch=None):
    """The label party's hello, naming ``run`` and ``epoch`` to resume from (if not None)."""
    cfg, x, _, digest = label(tmp)
    from atoll.vertical.protocol import hello as h
    return json.dumps(h(cfg, len(x), digest) | ({"run": run, "resume": epoch} if run else {})).encode()


def test_bogus_claims_are_refused_naming_the_field(tmp_path):
    setup(tmp_path, epochs=2)
    bank_dir, tel_dir = dirs(tmp_path)
    train(tmp_path, party(tmp_path, tel_dir), bank_dir)  # both hold epochs 1, 2
    run = torch.load(bank_dir / "checkpoint-2.pt", weights_only=True)["run"]
    for r, e, error in ((run, 5, r"resume run \w+ from epoch 5; this party's run folder holds epochs \[1, 2\]"),
                        (run, -1, "'resume' an epoch >= 0"), (run, True, "'resume' an epoch >= 0"),
                        ("0" * 32, 2, "belongs to another run or configuration"),
                        ("x" * 32, 1, "'run' must be 32 hex digits")):
        with pytest.raises(PartyError, match=r"party 'bank': field 'hello': .*" + error):
            party(tmp_path, tel_dir).on("hello", hello(tmp_path, r, e), "bank")
    with pytest.raises(PartyError, match="this party has no run folder"):
        party(tmp_path).on("hello", hello(tmp_path, run, 1), "bank")
    tel = party(tmp_path, tel_dir)
    tel.on("hello", hello(tmp_path, run, 1), "bank")
    assert (tel.epoch, tel.steps) == (1, 4)
    for claim in ({"epoch": 2, "steps": 5}, {"epoch": 3, "steps": 4}, {"epoch": 1, "steps": 4}, "x"):
        with pytest.raises(PartyError, match=r"field 'checkpoint' says .* expects \{'epoch': 2, 'steps': 4\}"):
            tel.on("checkpoint", json.dumps(claim).encode(), "bank")
    assert resume.held(tel_dir) == [1, 2]
    fresh = party(tmp_path)
    fresh.on("hello", hello(tmp_path), "bank")
    with pytest.raises(PartyError, match="was not asked to checkpoint"):
        fresh.on("checkpoint", json.dumps({"epoch": 1, "steps": 0}).encode(), "bank")


class Liar:
    """A feature party that claims another epoch or run in its hello answer."""

    def __init__(self, tel, change):
        self.tel, self.change = tel, change

    def on(self, name, msg, sender):
        out = self.tel.on(name, msg, sender)
        return json.dumps(json.loads(out) | self.change).encode() if name == "hello" else out


@pytest.mark.parametrize("change", [{"resume": 2}, {"run": "0" * 32}, {"columns": "2"}])
def test_a_peer_answering_another_epoch_or_run_is_refused(tmp_path, change):
    setup(tmp_path, epochs=2)
    bank_dir, tel_dir = dirs(tmp_path)
    train(tmp_path, party(tmp_path, tel_dir), bank_dir, stop_at=5)  # both hold epoch 1
    with pytest.raises(PartyError, match="party 'telecom': field 'hello' answers"):
        train(tmp_path, Liar(party(tmp_path, tel_dir), change), bank_dir)


def _tamper(path, change):
    ck = torch.load(path, weights_only=True)
    change(ck)
    torch.save(ck, path)


def top_weight(t):
    return lambda ck: ck["label"]["model"].update({"top.0.weight": t})


F64 = {"dtype": torch.float64}


@pytest.mark.parametrize("who,change,error", [
    ("bank", top_weight(torch.full((4, 6), float("nan"), **F64)), "holds NaN or infinite values"),
    ("bank", top_weight(torch.zeros(4, 7, **F64)), "'top.0.weight' is not a torch.float64 tensor of shape \\(4, 6\\)"),
    ("bank", top_weight(torch.zeros(4, 6)), "'top.0.weight' is not a torch.float64 tensor"),
    ("bank", lambda ck: ck.update(epoch=9), "is not a checkpoint of a vertical run of 2 epochs"),
    ("bank", lambda ck: ck.update(config="0" * 64), "belongs to another configuration"),
    ("bank", lambda ck: ck.update(losses=ck["losses"][:-1]), "'losses' does not hold the 1 epochs' step losses"),
    ("bank", lambda ck: ck.update(pad=torch.zeros(1 << 20, **F64)), "more than this run's models can need"),
    ("tel", lambda ck: ck["party"]["model"].update({"0.bias": torch.tensor([1.0, float("inf"), 0.0], **F64)}),
     "holds NaN or infinite values"),
    ("tel", lambda ck: ck["party"]["opt"]["state"][0].update(exp_avg=torch.zeros(2, 2, **F64)),
     "optimizer state 'exp_avg' does not fit"),
    ("tel", lambda ck: ck.update(steps=0), "checkpoint-1.pt does not hold epoch 1"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path, who, change, error):
    setup(tmp_path, epochs=2)
    bank_dir, tel_dir = dirs(tmp_path)
    train(tmp_path, party(tmp_path, tel_dir), bank_dir, stop_at=5)  # both hold epoch 1
    _tamper((bank_dir if who == "bank" else tel_dir) / "checkpoint-1.pt", change)
    with pytest.raises((ValueError, PartyError), match=error):
        got = train(tmp_path, party(tmp_path, tel_dir), bank_dir)
        raise ValueError(got.get("error", "no error"))


def test_a_changed_table_or_a_folder_with_checkpoints_without_resume_is_refused(tmp_path, capsys):
    setup(tmp_path, epochs=2)
    bank_dir, tel_dir = dirs(tmp_path)
    train(tmp_path, party(tmp_path, tel_dir), bank_dir, stop_at=5)
    with pytest.raises(ValueError, match=r"holds the checkpoints of epochs \[1\]: pass --resume"):
        vertical.run_folder(bank_dir, False)
    csv = tmp_path / "tel.csv"
    csv.write_text(csv.read_text().replace("zzz,1.0,2.0", "zzz,1.0,3.0"))
    with pytest.raises(PartyError, match="belongs to another run or configuration"):
        party(tmp_path, tel_dir).on("hello", hello(tmp_path, torch.load(
            bank_dir / "checkpoint-1.pt", weights_only=True)["run"], 1), "bank")
    assert main(["vertical", "connect", "localhost:1", str(tmp_path / "tel.toml"), "--ca", "x",
                 "--run-dir", str(tel_dir)]) == 2
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("killed", ["telecom", pytest.param("bank", marks=pytest.mark.slow)])
def test_a_party_killed_by_sigkill_resumes_to_the_uninterrupted_run(tmp_path, killed):
    """The real thing: two processes over gRPC, one killed (SIGKILL) mid-run, both restarted
    with --resume: the label party's losses and both saved models equal an uninterrupted run's."""
    token = setup(tmp_path, epochs=60)
    whole_tel = party(tmp_path)
    whole = train(tmp_path, whole_tel)
    serve = ["serve", "bank.toml", "--run-dir", "bank_run", "--out", "bank.json", "--model", "bank.pt"]
    procs = []

    def both(extra, log):
        bank = start(tmp_path, serve + ["--every", "10"] + extra, tmp_path / f"bank{log}.log")
        tel = start(tmp_path, ["connect", f"localhost:{port(bank, tmp_path / f'bank{log}.log')}", "tel.toml",
                               "--ca", "certs/ca.pem", "--token-file", token, "--run-dir", "tel_run",
                               "--model", "tel.pt"] + extra, tmp_path / f"tel{log}.log")
        procs.extend((bank, tel))
        return bank, tel

    try:
        bank, tel = both([], 1)
        end = time.monotonic() + 120
        while '"step": 30,' not in (tmp_path / "bank1.log").read_text():
            assert bank.poll() is None and time.monotonic() < end, (tmp_path / "bank1.log").read_text()
            time.sleep(0.02)
        (tel if killed == "telecom" else bank).send_signal(signal.SIGKILL)
        assert bank.wait(60) != 0 and tel.wait(60) != 0
        held = resume.held(tmp_path / "bank_run")
        assert held and held[-1] < 60  # killed mid-run
        assert not (tmp_path / "bank.json").exists() or "error" in json.loads((tmp_path / "bank.json").read_text())
        bank, tel = both(["--resume"], 2)
        assert bank.wait(300) == 0, (tmp_path / "bank2.log").read_text()
        assert tel.wait(60) == 0, (tmp_path / "tel2.log").read_text()
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
    got = json.loads((tmp_path / "bank.json").read_text())
    assert "error" not in got and got["resumed_from_epoch"] == held[-1] >= 1
    assert got["losses"] == whole["losses"] and len(got["losses"]) == 240  # float64, bit for bit
    assert got["auc"] == whole["auc"]
    for path, want in (("bank.pt", whole["state"]), ("tel.pt", whole_tel.state())):
        saved = torch.load(tmp_path / path, weights_only=True)
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], v) for k, v in want.items())


@pytest.mark.slow
def test_a_stopped_hetero_lr_run_resumes_to_the_uninterrupted_losses(tmp_path):
    """Hetero LR: the passive party restores its weights once the fresh public key arrived; the
    masks cancel mod n, so the losses and both weight vectors are exact all the same."""
    pytest.importorskip("phe")
    setup(tmp_path, epochs=3, protocol="hetero_lr")
    whole_tel = party(tmp_path)
    whole = train(tmp_path, whole_tel)
    bank_dir, tel_dir = dirs(tmp_path)
    cut = train(tmp_path, party(tmp_path, tel_dir), bank_dir, stop_at=6)
    assert cut["steps"] == 6 and resume.held(tel_dir) == resume.held(bank_dir) == [1]
    tel = party(tmp_path, tel_dir)
    done = train(tmp_path, tel, bank_dir)
    assert "error" not in done and done["resumed_from_epoch"] == 1
    assert done["losses"] == whole["losses"] and len(done["losses"]) == 12
    assert torch.equal(done["state"]["w"], whole["state"]["w"]) and torch.equal(tel.state()["w"], whole_tel.state()["w"])
