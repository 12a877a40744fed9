"""A malicious server against a deployed client's side of secure aggregation.

The victim runs the deployed client's code path (``Client._setup`` from the config text,
``Client._answer`` for its training answer, ``Client._stage`` for every stage request, no
gRPC); its neighbours are ``secagg.Client`` parties; the server is a real ``secagg.Server``
that deviates where the attack needs it. The victim must never reveal both shares of one
neighbour, run one protocol per round, and refuse a setup weaker than its config's.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from atoll import config
from atoll.client import params_of
from atoll.deploy.client import Client
from atoll.deploy.coordinator import downlink_bytes
from atoll.secure import primitives as pr
from atoll.secure import secagg, shamir
from atoll.secure import stagewire as W

TEXT = """
dtype = "float64"
rounds = 2
[data]
name = "digits"
num_clients = 5
[model]
name = "logreg"
[client]
batch_size = 32
[secure]
method = "secagg+"
neighbours = 4
max_weight = 400.0
"""


class Conn:
    def submit(self, r, task_id, message, **head):
        self.message, self.head = message, head
        return True, ""


class Task:
    def __init__(self, r, data, stage=0):
        self.round, self.task_id, self.data, self.stage = r, "t", data, stage


def victim(text=TEXT):
    """The deployed client 0 after its round-1 training answer (the header alone)."""
    cfg = config.load(text=text)
    algorithm, model, fed, plan = config.build(cfg)
    state = algorithm.init(params_of(model))
    c = Client("unused:1", fed.clients[0], token="t", insecure=True)
    c._setup({"config_toml": text, "n_features": fed.n_features, "n_classes": fed.n_classes,
              "num_clients": 5, "client_id": 0, "name": "client-0"})
    conn = Conn()
    c._answer(conn, Task(1, downlink_bytes(algorithm, state, plan.seed)))
    assert conn.message == b"" and conn.head["num_examples"] == fed.clients[0].n
    return c


def ask(c: Client, stage: int, data: bytes, r: int = 1) -> bytes:
    conn = Conn()
    c._stage(conn, Task(r, data, stage))
    assert conn.head["stage"] == stage
    return conn.message


def three_stages(c: Client, setup: secagg.Setup):
    """Stages 1-3 with the victim (0) and honest parties 1-4; returns (server, parties, x)."""
    rng = np.random.default_rng(0)
    d, server = setup.d, secagg.Server(setup)
    parties = {u: secagg.Client(setup, u) for u in range(1, 5)}
    x = {u: rng.integers(0, 1 << setup.bits, d, dtype=np.uint64) for u in parties}
    keys = {u: p.advertise() for u, p in parties.items()} | {0: W.read_keys(ask(c, 1, W.setup_bytes(setup)))}
    keys = server.collect_keys(keys)
    sent = {u: p.share(keys[u]) for u, p in parties.items()}
    mine = W.records({v: W.keys_bytes(k) for v, k in keys[0].items()})
    sent[0] = W.read_records(ask(c, 2, mine), W.CT, keys[0], "shares")
    inbox = server.collect_shares(sent)
    masked = {u: p.masked(x[u], inbox[u]) for u, p in parties.items()}
    masked[0] = ask(c, 3, W.records(inbox[0]))
    server.collect_inputs(masked)
    return server, parties, x


def setup_for(c: Client, **change) -> secagg.Setup:
    st = c.secure.secure.setup(range(5), 1, len(c.secure.x))
    return secagg.Setup(**{**st.__dict__, **change})


def test_the_client_never_reveals_both_shares_of_one_neighbour():
    c = victim()
    three_stages(c, setup_for(c))
    both = W.request_bytes({0, 1, 2}, {2})  # client 2 named survivor and dropped
    assert ask(c, 4, both) == b""
    assert "id 2 appears twice" in c.secure.refused[-1]
    assert c.secure.party.revealed == {}
    assert ask(c, 4, W.request_bytes({0, 1, 2, 3, 4}, set())) == b""  # no second try this round


def test_a_second_unmask_request_or_a_second_protocol_run_in_one_round_is_refused():
    c = victim()
    three_stages(c, setup_for(c))
    out = W.read_shares(ask(c, 4, W.request_bytes({0, 1, 2, 3}, {4})),
                        {1: "b", 2: "b", 3: "b", 4: "s"})
    assert set(out) == {1, 2, 3, 4}
    assert ask(c, 4, W.request_bytes({0, 4}, set())) == b""  # now the other share of 4
    assert "expected stage 5 of round 1" in c.secure.refused[-1]
    assert ask(c, 1, W.setup_bytes(setup_for(c, session=os.urandom(16)))) == b""  # a fresh run
    assert c.secure.party.revealed == {1: "b", 2: "b", 3: "b", 4: "s"}


def test_a_lowered_threshold_is_refused_it_would_reveal_the_input():
    # the attack, against protocol parties that accept what the server sends: with t = 1 one
    # neighbour's share of each kind rebuilds b_0 and s_0, and the server unmasks x_0 alone
    c = victim()
    weak = setup_for(c, threshold=1)
    naive = secagg.Client(weak, 0)
    x0 = np.arange(weak.d, dtype=np.uint64) % 7
    server = secagg.Server(weak)
    parties = {0: naive} | {u: secagg.Client(weak, u) for u in range(1, 5)}
    keys = server.collect_keys({u: p.advertise() for u, p in parties.items()})
    inbox = server.collect_shares({u: p.share(keys[u]) for u, p in parties.items()})
    y0 = pr.unpack(naive.masked(x0, inbox[0]), weak.d, weak.bits)
    for u in range(1, 5):
        parties[u].masked(np.zeros(weak.d, dtype=np.uint64), inbox[u])
    b = parties[1].unmask({0, 1}, set())[0][1]       # neighbour 1 told 0 survived
    s = parties[2].unmask({2}, {0})[0][1]            # neighbour 2 told 0 dropped
    b0 = shamir.combine({weak.x(1): shamir.from_bytes(b, 11)}, 32, 1)
    s0 = shamir.combine({weak.x(2): shamir.from_bytes(s, 11)}, 32, 1)
    x = y0 - pr.prg(b0, weak.d, weak.bits)
    for v in range(1, 5):  # 0 < v: the victim added +PRG(s_0v)
        x = x - pr.prg(pr.agree(s0, keys[0][v][1], b"mask"), weak.d, weak.bits)
    assert np.array_equal(x & np.uint64((1 << weak.bits) - 1), x0)  # the attack works
    # the deployed client derives the threshold from its own config and refuses
    assert ask(c, 1, W.setup_bytes(weak)) == b""
    assert "threshold 1 (expected 3)" in c.secure.refused[-1]
    assert c.secure.party is None


@pytest.mark.parametrize("change,words", [
    ({"bits": 8}, "bits 8"), ({"d": 3}, "length 3"), ({"round": 2}, "round 2"),
    ({"clients": (1, 2, 3, 4, 5)}, "client 0 is not in the cohort")])
def test_a_setup_that_differs_from_the_clients_own_derivation_is_refused(change, words):
    c = victim()
    assert ask(c, 1, W.setup_bytes(setup_for(c, **change))) == b""
    assert words in c.secure.refused[-1]


def test_malformed_requests_are_refused_before_they_are_used():
    c = victim()
    head = W.setup_bytes(setup_for(c))
    huge = head[:24] + (10 ** 6).to_bytes(4, "little") + head[28:]  # claims a million clients
    assert ask(c, 1, huge) == b"" and "1000000 clients, not in [2, 5]" in c.secure.refused[-1]
    c = victim()
    ask(c, 1, head)
    keys = W.records({1: os.urandom(64)}) * 2  # one neighbour twice
    assert ask(c, 2, keys) == b"" and "appears twice" in c.secure.refused[-1]


def test_a_bucket_smaller_than_the_configured_bucket_size_is_refused():
    """With aggregator.bucket the server learns each bucket's sum. Before the check the client
    accepted any cohort its parameters fit, so a server could put it in a bucket with one sybil
    (whose input it knows) and read its update as the sum minus the sybil's."""
    c = victim(TEXT + '[aggregator]\nname = "median"\nbucket = 3\n')
    d = len(c.secure.x)
    assert ask(c, 1, W.setup_bytes(c.secure.secure.setup([0, 1], 1, d))) == b""
    assert "a cohort of 2 clients, smaller than the bucket size aggregator.bucket = 3" in c.secure.refused[-1]
    c = victim(TEXT + '[aggregator]\nname = "median"\nbucket = 3\n')
    assert len(ask(c, 1, W.setup_bytes(c.secure.secure.setup([0, 1, 2], 1, d)))) == W.KEYS


def test_the_clients_policy_sets_the_smallest_cohort_and_can_require_a_secure_sum():
    """The server writes the config, [secure] and aggregator.bucket included: only the client's
    own policy bounds what the server learns. Before the policy's [secure] section, a cohort of
    two (the victim and a sybil) was accepted, and a run without [secure] too."""
    from atoll.deploy import policy

    c = victim()
    c.secure.min_cohort = 4  # what Client sets from policy.secure.min_cohort
    assert ask(c, 1, W.setup_bytes(c.secure.secure.setup([0, 1, 2], 1, len(c.secure.x)))) == b""
    assert "fewer than this client's policy secure.min_cohort = 4" in c.secure.refused[-1]
    strict = policy.Guard(policy.load({"secure": {"require": True}}))
    cfg = config.load(text=TEXT.replace('method = "secagg+"', 'method = "none"'))
    algorithm, model, fed, plan = config.build(cfg)
    with pytest.raises(policy.PolicyError, match="secure.method = 'none' is not a secure sum"):
        strict.built(cfg, plan, fed.clients[0].n, 0)
