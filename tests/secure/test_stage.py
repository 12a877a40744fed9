"""Secure aggregation as the round's sum: exact against the plain integer sum, unbiased against
weighted FedAvg, surviving failing clients, failing cleanly, and refusing what it cannot hide."""
import numpy as np
import pytest
import torch

from atoll import config
from atoll.runtime.loop import LoopRuntime
from atoll.secure.stage import SecureSum
from atoll.simulation import simulate

from tests.privacy.test_privacy_run import BASE as PRIVACY_BASE

BASE = PRIVACY_BASE.replace("num_clients = 6", "num_clients = 8").replace("steps = 2", "steps = 3")


def test_mean_is_the_plain_integer_sum_decoded_bit_for_bit():
    sec = SecureSum(clip=0.5, max_weight=100.0, input_bits=12, neighbours=4)
    g = torch.Generator().manual_seed(0)
    like = {"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.float64)}
    inputs = {}
    for cid in range(7):
        delta = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.3 for k, v in like.items()}
        inputs[cid] = sec.encode(delta, n=10 * (cid + 1), key=cid)
    mean, stats = sec.aggregate(inputs, 1, like)
    plain = np.sum(np.stack(list(inputs.values())), axis=0)  # what the protocol must reveal
    want = torch.from_numpy(plain[:-1].astype(np.float64) / float(plain[-1]) * 0.5)
    got = torch.cat([mean["w"].reshape(-1), mean["b"]])
    assert torch.equal(got, want)
    assert stats["secure_survivors"] == 7 and stats["secure_bits"] == 12 + 3


def test_encoding_is_unbiased_and_weighted_like_fedavg():
    sec = SecureSum(clip=1.0, max_weight=50.0, input_bits=8)
    x = {"w": torch.tensor([0.3, -0.7, 0.05], dtype=torch.float64)}
    draws = np.stack([sec.encode(x, n=25, key=k) for k in range(4000)]).astype(np.float64)
    est = draws.mean(0) / sec.top  # (w x / clip, w) with w = 25 / 50
    assert np.allclose(est, [0.15, -0.35, 0.025, 0.5], atol=4 / np.sqrt(4000) / sec.top * 10)
    with pytest.raises(ValueError, match="not finite"):
        sec.encode({"w": torch.tensor([float("nan")])}, 1, 0)


def _run(over, runtime=None):
    alg, model, fed, plan = config.build(config.load(text=BASE, overrides=list(over)))
    return simulate(alg, model, fed, plan, runtime=runtime or LoopRuntime(), plots=False)


@pytest.mark.parametrize("method", [["secure.method=secagg"],
                                    ["secure.method=secagg+", "secure.neighbours=4"]])
def test_secure_run_follows_plaintext_fedavg_within_the_quantization(method):
    plain, sec = _run([]), _run(method + ["secure.clip=0.5", "secure.bits=16"])
    step = 0.5 / (2 ** 15 - 1)
    for k in plain.state.params:
        diff = float((plain.state.params[k] - sec.state.params[k]).abs().max())
        assert diff < 20 * step, k  # 3 rounds of averaged, unbiased rounding errors
    line = sec.metrics[-1]
    assert line["secure_survivors"] == 8 and line["bytes_up"] == 8 * line["secure_bytes_up"]
    assert line["bytes_up"] < plain.metrics[-1]["bytes_up"]  # 19-bit ring vs float64


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_thirty_percent_dropout_at_each_stage_keeps_the_sum_exact(stage):
    sec = SecureSum(clip=0.5, max_weight=10.0, input_bits=10, neighbours=8, dropout=0.3,
                    dropout_stage=stage)
    g = torch.Generator().manual_seed(stage)
    like = {"w": torch.zeros(5, dtype=torch.float64)}
    inputs = {c: sec.encode({"w": torch.randn(5, generator=g, dtype=torch.float64)}, 5, c)
              for c in range(10)}
    mean, stats = sec.aggregate(inputs, 7, like)
    gone = sec.dropped(list(range(10)), 7)
    # stage 4 drops after the inputs were sent: their sum is still everyone's
    kept = [c for c in inputs if stage == 4 or c not in gone]
    plain = np.sum(np.stack([inputs[c] for c in kept]), axis=0)
    assert torch.equal(mean["w"], torch.from_numpy(plain[:-1] / float(plain[-1]) * 0.5))
    assert stats["secure_survivors"] == len(kept) and len(gone) == 3


def test_a_round_that_cannot_finish_securely_leaves_the_model_unchanged():
    res = _run(["secure.method=secagg+", "secure.neighbours=4", "secure.dropout=0.75",
                "secure.dropout_stage=4", "rounds=1"])  # too few left to rebuild the masks
    assert any("secure aggregation failed" in why for _, why in res.metrics[0]["failures"])
    alg, model, fed, plan = config.build(config.load(text=BASE, overrides=["rounds=1"]))
    init = alg.init({k: v.detach() for k, v in model.named_parameters()})
    for k in init.params:
        assert torch.equal(res.state.params[k], init.params[k])


@pytest.mark.parametrize("over, part", [
    (["aggregator.name=median"], "aggregator.name = 'median'"),
    (["algorithm.name=fednova"], "reads each client's aux on its own"),
    (["comm.uplink=top_k(0.1)"], "is not linear"),
    (["privacy.mode=local", "privacy.noise_multiplier=1.0"], "privacy.mode"),
    (["aggregator.name=median", "aggregator.bucket=1"], "a secure bucket needs at least 2"),
    (["aggregator.name=median", "aggregator.nnm=true"], "with nnm needs each client's"),
    (["aggregator.name=median", "aggregator.arc=true", "aggregator.f=1"], "with arc needs each client's"),
    (["async.mode=fedbuff"], "[async]"),
    (["secure.threshold=9", "secure.method=secagg+", "secure.neighbours=4"], "exceeds"),
])
def test_parts_a_secure_sum_would_hide_are_refused_naming_both(over, part):
    with pytest.raises(config.ConfigError) as info:
        config.build(config.load(text=BASE, overrides=["secure.method=secagg"] + over))
    assert part in str(info.value) and "secure." in str(info.value)


def test_buckets_cover_the_cohort_in_random_groups_of_at_least_s():
    sec = SecureSum(clip=1.0, max_weight=1.0, bucket=3)
    groups = sec.buckets(list(range(11)), key=5)
    assert sorted(c for g in groups for c in g) == list(range(11))
    assert [len(g) for g in groups] == [3, 3, 5]  # the short last bucket joined the one before
    assert groups == sec.buckets(list(range(11)), key=5)
    assert groups != sec.buckets(list(range(11)), key=6)
    assert SecureSum(clip=1.0, max_weight=1.0).buckets([3, 1, 2], key=5) == [[1, 2, 3]]


def test_a_robust_rule_over_secure_buckets_survives_an_attacker_that_ruins_the_secure_mean():
    """An attacker's noise (clamped to secure.clip) drags the secure mean down; the median of
    the means of securely summed buckets of 2 does not move. Before: refused ("not built")."""
    base = ["secure.method=secagg+", "secure.neighbours=4", "secure.clip=1.0", "rounds=6"]
    attack = ["attack.name=gaussian", "attack.count=1"]
    clean = _run(base)
    mean = _run(base + attack)
    robust = _run(base + attack + ["aggregator.name=median", "aggregator.bucket=2"])
    assert mean.final["test_acc"] < clean.final["test_acc"] - 0.2
    assert robust.final["test_acc"] >= clean.final["test_acc"] - 0.02
    assert robust.metrics[-1]["secure_buckets"] == 4 and robust.metrics[-1]["secure_survivors"] == 8


def test_over_buckets_every_client_counts_one_in_its_bucket_mean():
    """Under aggregator.bucket the bucket means are unweighted (secure.max_weight defaults to 1),
    as the robust rules weigh every client's row alike in plaintext: a client's record count is
    its own claim, and weighing it let one attacker outweigh its bucket's honest half. Without
    buckets the secure mean stays weighted FedAvg (max_weight: the largest count). Before:
    count-weighted bucket means (the pair below: 0.96 x_big + 0.04 x_small)."""
    cfg = lambda *o: config.load(text=BASE, overrides=["secure.method=secagg", "secure.clip=1.0", *o])  # noqa: E731
    alg, _, fed, _ = config.build(cfg("aggregator.name=median", "aggregator.bucket=2"))
    counts = sorted(c.n for c in fed.clients)
    assert alg.secure.max_weight == 1.0 and alg.secure.bucket == 2
    assert config.build(cfg())[0].secure.max_weight == float(counts[-1])
    assert config.build(cfg("aggregator.name=median", "aggregator.bucket=2",
                            "secure.max_weight=500"))[0].secure.max_weight == 500.0  # as set
    like = {"w": torch.zeros(4, dtype=torch.float64)}
    big, small = torch.tensor([0.8, -0.4, 0.2, 0.0]), torch.tensor([-0.6, 0.2, 0.4, 0.1])
    inputs = {0: alg.secure.encode({"w": big}, n=counts[-1], key=0),  # the largest client ...
              1: alg.secure.encode({"w": small}, n=counts[-1] / 24, key=1)}  # ... and one 24x smaller
    mean, _ = alg.secure.aggregate(inputs, 1, like)
    assert torch.allclose(mean["w"], ((big + small) / 2).double(), atol=2 / alg.secure.top)


@pytest.mark.parametrize("uplink, clip", [("count_sketch(3, 100, estimator=mean)", 1.0),
                                          ("rand_k(0.2, masked=true)", 10.0)])  # kept values x 5
def test_linear_codecs_are_summed_securely_and_decoded_once(uplink, clip):
    """The clients' payloads (a sketch table, a masked rand-k vector) go into the secure sum as
    they are and the mean payload is decoded once: the model follows the plaintext run with the
    same codec to the quantizer's precision. Before: refused ("only the plain uplink")."""
    base = ["rounds=2", f"comm.uplink={uplink}"]
    plain = _run(base)
    sec = _run(base + ["secure.method=secagg+", "secure.neighbours=4", f"secure.clip={clip}"])
    step = clip / (2 ** 15 - 1)  # one quantization step of a 16-bit input
    for k, v in plain.state.params.items():
        err = float((sec.state.params[k] - v).abs().max())
        assert err <= 50 * step, (k, err)
    assert sec.metrics[-1]["secure_survivors"] == 8
    full = _run(["rounds=1", "secure.method=secagg+", "secure.neighbours=4", "secure.clip=1.0"])
    if "sketch" in uplink:  # the secure vector is the table (300 numbers), not the model (650)
        assert sec.metrics[-1]["secure_bytes_up"] < 0.5 * full.metrics[-1]["secure_bytes_up"]


@pytest.mark.parametrize("algo", ["scaffold", "fedagrac"])
def test_an_algorithm_reading_the_aux_mean_sums_its_aux_securely(algo):
    """SCAFFOLD's control-variate changes and FedaGrac's gradients travel in the secure sum
    with the delta: model and control variate follow the plaintext run to the quantizer's
    precision, with the cohort counted right. Before: refused."""
    base = ["rounds=2", f"algorithm.name={algo}"]
    plain = _run(base)
    sec = _run(base + ["secure.method=secagg+", "secure.neighbours=4", "secure.clip=8.0"])
    step = 8.0 / (2 ** 15 - 1)
    shared = "c" if algo == "scaffold" else "vtilde"
    for got, want in ((sec.state.params, plain.state.params),
                      (sec.state.extra["broadcast"][shared], plain.state.extra["broadcast"][shared])):
        for k, v in want.items():
            assert float((got[k] - v).abs().max()) <= 50 * step, k
    assert float(sum(v.abs().sum() for v in sec.state.extra["broadcast"][shared].values())) > 0


def test_a_client_whose_sketch_has_other_hashes_is_left_out_of_the_secure_sum():
    """Summing sketch tables drawn with different hashes would be garbage: a client that sends
    another hash seed is left out with the reason (before: one such client failed the round for
    all); the others' sum steps the model exactly as a round without it."""
    from atoll import rng
    from atoll import tree as T
    from atoll.runtime.base import Outcome, RoundStats
    from atoll.runtime.round import close_round, uplink_codec
    from atoll.transport import wire

    over = ["comm.uplink=count_sketch(3, 100, estimator=mean)", "secure.method=secagg",
            "secure.clip=1.0", "rounds=1"]
    alg, model, fed, plan = config.build(config.load(text=BASE, overrides=over))
    state = alg.init({k: v.detach() for k, v in model.named_parameters()})
    delta = {k: 0.01 * torch.ones_like(v) for k, v in state.params.items()}
    outcomes = []
    for cid in range(4):
        codec = uplink_codec(alg, plan.seed, 1)
        if cid == 3:  # the liar: the hashes of another round
            codec = uplink_codec(alg, plan.seed, 2)
        payload, _ = codec.encode(delta, codec.init(delta), rng.key(plan.seed, 1, cid, "uplink"))
        outcomes.append(Outcome(cid, cid, wire.dumps(T.join({"delta": payload, "aux": {}})),
                                {"uplink": ()}, 1.0, 10.0, False))
    stats = RoundStats(sampled=4)
    new, _ = close_round(alg, state, outcomes, fed, plan.work, stats, plan.seed)
    assert [(cid, "another round's hashes" in why) for cid, why in stats.failures] == [(3, True)]
    assert stats.extra["secure_survivors"] == 3
    honest, _ = close_round(alg, state, outcomes[:3], fed, plan.work, RoundStats(sampled=3), plan.seed)
    assert any(not torch.equal(new.params[k], v) for k, v in state.params.items())
    for k, v in honest.params.items():
        assert torch.equal(new.params[k], v)


@pytest.mark.parametrize("stage", [3, 4, 5])
def test_malicious_mode_gives_the_semi_honest_model_bit_for_bit(stage):
    over = ["secure.method=secagg+", "secure.neighbours=6", "secure.clip=0.5", "secure.dropout=0.125",
            f"secure.dropout_stage={min(stage, 4)}"]
    plain = _run(over)
    mal = _run(over[:-1] + [f"secure.dropout_stage={stage}", "secure.malicious=true"])
    for k in plain.state.params:  # the same survivors' inputs: the same sums, bit for bit
        assert torch.equal(plain.state.params[k], mal.state.params[k]), k
    assert mal.metrics[-1]["secure_survivors"] == (7 if stage == 3 else 8)
    with pytest.raises(ValueError, match="dropout_stage in 1..4"):
        _run(over[:-1] + ["secure.dropout_stage=5"])
