"""bench/psi.py --replay: a party timed alone against a replay of its peer gets the answers the
live peer gave (it sends the same bytes, so the recorded answers are the live peer's answers to
them), and the seeded secrets that make this possible are out of reach of atoll itself."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atoll.vertical import psi_group
from atoll.vertical.psi import Message, QueueChannel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def psi_replay(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import psi_replay
    return psi_replay


def test_replay_peer_answers_as_the_live_peer(tmp_path):
    out = tmp_path / "psi.json"
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "psi.py"), "--n", "300", "--overlap",
                          "0.3", "--replay", "--json", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    live = {r["name"][0]: r for r in figures["live"]}
    for who in "AB":
        alone, peer = figures[f"replay {who}"]
        assert alone["name"][0] == who and peer["name"] == "replay peer"
        assert alone["correct"] and live[who]["correct"] and alone["size"] == 90
        for k in ("size", "sent", "received"):
            assert alone[k] == live[who][k]
        # every message the party sent equals the live run's: hello, blinded, reblinded
        assert peer["equal"] == peer["received"] == peer["expected"] == 3 == peer["sent"]


def test_replay_notices_a_party_that_sends_other_bytes(psi_replay):
    mine, theirs = QueueChannel.pair()
    expect = [Message("hello", nonce=b"a" * 32), Message("blinded", data=b"x" * 32)]
    script = [Message("hello", nonce=b"b" * 32), Message("blinded", data=b"y" * 32)]
    mine.send(Message("hello", nonce=b"a" * 32))
    mine.send(Message("blinded", data=b"z" * 32))  # not what the party sent in the live run
    mine.close()
    stats = psi_replay.replay(theirs, script, expect, timeout=5)
    assert stats == {"sent": 2, "received": 2, "equal": 1, "expected": 2}
    assert [mine.recv(1) for _ in range(2)] == script


def test_replay_waits_for_the_party(psi_replay):
    """Its k-th message of a kind goes only once the party sent its k-th of that kind."""
    mine, theirs = QueueChannel.pair()
    expect = [Message("hello"), Message("blinded", data=b"1"), Message("blinded", data=b"2")]
    script = [Message("hello"), Message("blinded", data=b"3"), Message("blinded", data=b"4")]
    mine.send(expect[0])
    mine.close()  # the party stops after its hello
    assert psi_replay.replay(theirs, script, expect, timeout=5)["sent"] == 1
    assert mine.recv(1) == script[0]
    with pytest.raises(TimeoutError):  # nothing more came
        mine.recv(0.2)


def test_seeded_secrets_stay_in_the_bench():
    a, b = psi_group.fresh(32), psi_group.fresh(32)
    assert a != b and len(a) == 32                     # atoll draws from the OS
    src = ROOT / "src" / "atoll"
    reach = re.compile(r"\bfresh\s*=[^=]|setattr\([^)]*fresh|import psi_replay|psi_replay\.seed")
    hits = [p for p in src.rglob("*.py") if reach.search(p.read_text())]
    assert hits == []                                  # nothing in atoll reaches the bench seed
