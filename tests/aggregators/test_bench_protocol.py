"""bench/robustness.py's two data protocols: ``share`` splits the data over all 10 + f clients;
``byzfl`` (ByzFL's ``DataDistributor``) splits it over the 10 honest clients only and gives each
attacker an IID draw from their pooled data, so no class is held by an attacker alone."""
import pytest
import robustness as R  # bench/robustness.py (tests/conftest.py)
import torch

from atoll import config


def _rows(x):
    return {tuple(r) for r in x.tolist()}


@pytest.mark.parametrize("split", ["dir0.1", "2labels"])
def test_byzfl_protocol_splits_over_the_honest_clients_and_attackers_draw_from_their_pool(split):
    f, seed = 2, 3
    text = R.config_text(split, "mean", f, "sign_flip", 1, seed)
    byz = R.federation("digits", text, f, seed, "byzfl")
    share = R.federation("digits", text, f, seed, "share")
    ten = config.build_data(config.load(text=text, overrides=[f"data.num_clients={R.HONEST}"]))
    assert len(byz.clients) == len(share.clients) == R.HONEST + f
    for mine, ref in zip(byz.clients[:R.HONEST], ten.clients):  # the 10-client split, unchanged
        assert torch.equal(mine.x, ref.x) and torch.equal(mine.y, ref.y)
    pool = _rows(torch.cat([c.x for c in ten.clients]))
    size = round(sum(c.n for c in ten.clients) / R.HONEST)
    attackers = byz.clients[R.HONEST:]
    for c in attackers:
        assert c.n == size and _rows(c.x) <= pool  # an average client's size, from the honest data
        assert len(_rows(c.x)) == size             # drawn without replacement
        assert len(c.y.unique()) == 10             # IID: every class (digits: ~130 samples)
    assert not torch.equal(attackers[0].x, attackers[1].x)  # each its own draw
    again = R.federation("digits", text, f, seed, "byzfl")
    assert all(torch.equal(a.x, b.x) for a, b in zip(again.clients, byz.clients))  # seeded
    # share: the same data over 12 clients, the attackers' shares included
    assert sum(c.n for c in share.clients) == sum(c.n for c in ten.clients)


def test_an_unknown_protocol_is_refused_by_name():
    text = R.config_text("iid", "mean", 1, None, 1, 0)
    with pytest.raises(ValueError, match="'byzantine'"):
        R.federation("digits", text, 1, 0, "byzantine")


def test_rows_name_their_protocol_and_merge_keeps_protocols_apart(tmp_path):
    """A byzfl row says so (a share row, as every row before the option, says nothing), and
    ``--merge`` never folds one protocol's attacks into the other's row."""
    import json

    def grid(attackers):
        a = R.arguments(["--data", "digits", "--split", "2labels", "--f", "1", "--seeds", "0",
                         "--attacks", "sign_flip", "--rounds", "2", "--no-clean", "--attackers", attackers])
        return R.grid(a, ["mean"], tmp_path / f"{attackers}.json")

    share, byz = grid("share")[0], grid("byzfl")[0]
    assert "attackers" not in share and byz["attackers"] == "byzfl"
    assert share["all"]["sign_flip"] != byz["all"]["sign_flip"]  # other clients' data, another run
    merged = R.merge([str(tmp_path / "share.json"), str(tmp_path / "byzfl.json")])
    assert len(merged) == 2
    assert sorted(r["all"]["sign_flip"] for r in merged) == sorted(
        [share["all"]["sign_flip"], byz["all"]["sign_flip"]])
    assert json.loads((tmp_path / "byzfl.json").read_text())[0]["attackers"] == "byzfl"


def test_worker_momentum_rows_say_so_and_stay_apart(tmp_path):
    """``--momentum`` changes the honest clients' uplink: its rows carry the momentum, ``--merge``
    keeps them apart from the rows without it, and ``--merge --momentum M`` selects them."""
    def run(momentum):
        a = R.arguments(["--data", "digits", "--split", "2labels", "--f", "1", "--attacks", "ipm",
                         "--rounds", "3", "--no-clean", "--momentum", str(momentum)])
        return R.grid(a, ["centered_clipping"], tmp_path / f"m{momentum}.json")[0]

    plain, mom = run(0.0), run(0.9)
    assert "momentum" not in plain and mom["momentum"] == 0.9
    assert plain["all"]["ipm"] != mom["all"]["ipm"]
    files = [str(tmp_path / "m0.0.json"), str(tmp_path / "m0.9.json")]
    assert sorted(r.get("momentum", 0.0) for r in R.merge(files)) == [0.0, 0.9]
    out = tmp_path / "merged.json"
    R.main(["--data", "digits", "--split", "2labels", "--f", "1", "--rules", "centered_clipping",
            "--momentum", "0.9", "--merge", ",".join(files), "--out", str(out)])
    assert [r["momentum"] for r in R.json.loads(out.read_text())] == [0.9]
