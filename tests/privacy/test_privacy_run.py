"""Privacy wired into training runs (``atoll.privacy_config``, ``atoll.privacy.run``): accounting per round, budget stop
and resume, DP-FedAvg noise and adaptive clipping, intrinsic integer aggregation, vmap == loop,
configuration errors."""
import json
import math

import pytest
import torch

from atoll import config
from atoll import privacy as P
from atoll.client import model_loss
from atoll.codecs import dithered_quantize
from atoll.algorithms.dp import dp_fedavg_server
from atoll.privacy.run import STATE_KEY
from atoll.runtime.base import draw_work
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate
from atoll import rng

BASE = """
rounds = 3
dtype = "float64"
[data]
name = "digits"
num_clients = 6
partition = "dirichlet"
alpha = 0.5
[model]
name = "logreg"
[client]
lr = 0.1
steps = 2
[eval]
federated = false
"""
DP_SGD = ["privacy.mode=dp_sgd", "privacy.sample_rate=0.1", "privacy.noise_multiplier=1.0"]
INTRINSIC = ["privacy.mode=intrinsic", "privacy.sample_rate=0.1", "privacy.step=20.0",
             "privacy.uniforms=5", "privacy.clip=0.5", "client.steps=1"]


def build(overrides=(), base=BASE):
    return config.build(config.load(text=base, overrides=list(overrides)))


def run(overrides=(), runtime=None, **kw):
    alg, model, fed, plan = build(overrides)
    return simulate(alg, model, fed, plan, runtime=runtime, plots=False, **kw)


# ------------------------------------------------------------------ accounting per round
def test_epsilon_per_round_is_monotone_and_equals_a_direct_accountant():
    res = run(DP_SGD)
    eps = [m["epsilon"] for m in res.metrics]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    for r, e in enumerate(eps, start=1):  # each round: 2 steps of poisson_gaussian(0.1, 1.0)
        acc = P.Accountant("pld")
        acc.step(P.poisson_gaussian(0.1, 1.0), 2 * r)
        assert e == pytest.approx(acc.epsilon(1e-5), rel=1e-12)
    info = res.final["privacy"]
    assert info["unit"] == "record" and info["neighboring"] == "add_remove"
    assert "PLDAccountant" in info["conversion"] and info["epsilon"] == eps[-1]
    assert info["stopped"] is None


def test_budget_stop_is_clean_and_resume_keeps_the_spent_budget(tmp_path):
    acc = P.Accountant("pld")
    acc.step(P.poisson_gaussian(0.1, 1.0), 4)
    eps2 = acc.epsilon(1e-5)
    acc.step(P.poisson_gaussian(0.1, 1.0), 2)
    eps3 = acc.epsilon(1e-5)
    target = (eps2 + eps3) / 2  # rounds 1-2 fit, round 3 does not
    over = DP_SGD + [f"privacy.target_epsilon={target}", "rounds=5"]
    res = run(over, run_dir=tmp_path)
    assert [m["round"] for m in res.metrics] == [1, 2] and res.state.round == 2
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["rounds"] == 2 and "test_acc" in final  # final evaluation ran
    assert "round 3 would raise epsilon" in final["privacy"]["stopped"]
    assert final["privacy"]["epsilon"] == pytest.approx(eps2, rel=1e-12) and eps2 <= target
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["round"] == 2 and P.Accountant.from_state(ck["extra"][STATE_KEY]).epsilon(1e-5) == \
        pytest.approx(eps2, rel=1e-12)
    # resuming the stopped run: the spent budget is still spent, no round runs
    again = run(over, run_dir=tmp_path, resume=True)
    assert again.state.round == 2 and again.final["privacy"]["stopped"]
    assert again.final["privacy"]["epsilon"] == pytest.approx(eps2, rel=1e-12)


def test_resumed_run_continues_the_ledger_exactly(tmp_path):
    full = run(DP_SGD + ["rounds=4"], run_dir=tmp_path / "full")
    run(DP_SGD + ["rounds=2"], run_dir=tmp_path / "cut")
    resumed = run(DP_SGD + ["rounds=4"], run_dir=tmp_path / "cut", resume=True)
    assert [m["epsilon"] for m in resumed.metrics] == [m["epsilon"] for m in full.metrics]
    a, b = (tmp_path / "full" / "metrics.jsonl").read_bytes(), (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    assert a == b


def test_calibrated_noise_spends_at_most_the_target():
    res = run(["privacy.mode=dp_sgd", "privacy.sample_rate=0.1", "privacy.target_epsilon=2.0",
               "privacy.accountant=rdp"])
    assert res.state.round == 3 and res.final["privacy"]["calibrated"]
    assert 0.95 * 2.0 < res.metrics[-1]["epsilon"] <= 2.0


# ------------------------------------------------------------------ DP-SGD under vmap
@pytest.mark.parametrize("extra", [[], ["privacy.norm=linf"], ["client.stragglers=0.5", "client.steps=3"]])
def test_dp_sgd_vmap_equals_loop_float64(extra):
    over = DP_SGD + ["model.name=mlp", "model.hidden=[8]"] + extra
    a = run(over, runtime=LoopRuntime())
    b = run(over, runtime=VmapRuntime(threads=1, chunk_clients=4))
    for k in a.state.params:
        torch.testing.assert_close(a.state.params[k], b.state.params[k], rtol=0, atol=1e-9)
    for ma, mb in zip(a.metrics, b.metrics):
        assert ma.keys() == mb.keys()
        for key, va in ma.items():
            assert va == pytest.approx(mb[key], abs=1e-9), key


def test_dp_sgd_batches_are_poisson_samples_with_predrawn_noise():
    alg, model, fed, plan = build(DP_SGD)
    update = alg.client(model_loss(model))
    params = dict(model.named_parameters())
    sizes = []
    for r in range(1, 41):
        b, mask, _ = draw_work(alg.draw, fed.clients[0], 0, r, 0, plan.work, params)
        assert b["noise/weight"].shape == (2, *params["weight"].shape)
        sizes += b["mask"].sum(1).tolist()
    n = fed.clients[0].n
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 0.1 * n) < 4 * math.sqrt(0.1 * 0.9 * n / len(sizes))  # Binomial(n, q)


# ------------------------------------------------------------------ DP-FedAvg
def test_dp_fedavg_server_noise_std_is_z_clip_over_expected_clients():
    z, clip, m = 1.3, 0.7, 4.0
    fn = dp_fedavg_server(m, z, None, None, 0.2)
    deltas = {"w": torch.zeros(5, 200_000, dtype=torch.float64)}
    extra = {"broadcast": {"dp": {"clip": torch.tensor([clip], dtype=torch.float64)}}}
    out, _ = fn(None, None, deltas, None, {}, 7, extra)
    assert float(out["w"].std()) == pytest.approx(z * clip / m, rel=0.01)
    assert abs(float(out["w"].mean())) < 4 * z * clip / m / math.sqrt(200_000)
    deltas = {"w": torch.ones(5, 3, dtype=torch.float64)}
    out, _ = dp_fedavg_server(m, 0.0, None, None, 0.2)(None, None, deltas, None, {}, 7, extra)
    assert torch.allclose(out["w"], torch.full((3,), 5 / m, dtype=torch.float64))  # sum / m


def test_dp_fedavg_update_noise_leaves_room_for_the_clip_count():
    over = ["privacy.mode=dp_fedavg", "sampling.method=poisson", "sampling.rate=0.5",
            "privacy.noise_multiplier=1.0", "privacy.target_quantile=0.5",
            "privacy.clip_count_stddev=1.0"]
    _, _, _, plan = build(over)
    z_up = plan.privacy.details["update_noise_multiplier"]
    assert z_up ** -2 + (2 * 1.0) ** -2 == pytest.approx(1.0 ** -2)  # Andrew et al. Thm 1


def test_adaptive_clipping_converges_to_the_target_quantile():
    norms = torch.linspace(0.0, 10.0, 101, dtype=torch.float64)  # the clients' update norms
    fn = dp_fedavg_server(101.0, 0.0, 1e-9, 0.3, 0.2)
    clip = torch.tensor([0.5], dtype=torch.float64)
    for i in range(300):
        extra = {"broadcast": {"dp": {"clip": clip}}}
        aux = {"dp_below": (norms <= clip[0]).to(torch.float64) - 0.5}
        _, extra = fn(None, None, {"w": torch.zeros(101, 1, dtype=torch.float64)}, None, aux, i, extra)
        clip = extra["broadcast"]["dp"]["clip"]
    assert float(clip[0]) == pytest.approx(3.0, abs=0.25)  # the 0.3 quantile of U[0, 10]


def test_dp_fedavg_run_logs_the_moving_clip_and_clips_on_the_client():
    over = ["privacy.mode=dp_fedavg", "sampling.method=poisson", "sampling.rate=0.5",
            "privacy.noise_multiplier=0.8", "privacy.target_quantile=0.5",
            "privacy.clip_count_stddev=1.0", "privacy.clip=5.0"]
    res = run(over)
    clips = [m["clip"] for m in res.metrics]
    assert clips[0] < 5.0 and clips[-1] < clips[0]  # updates are much smaller than 5: it shrinks
    assert res.final["privacy"]["unit"] == "client"


# ------------------------------------------------------------------ local DP
def test_local_mode_noise_is_z_times_twice_the_clip():
    alg, _, _, plan = build(["privacy.mode=local", "privacy.noise_multiplier=0.5", "privacy.clip=0.2"])
    tree = {"w": torch.zeros(100_000, dtype=torch.float64)}
    payload, _ = alg.uplink.encode(tree, alg.uplink.init(tree), 3)
    assert float(alg.uplink.decode(payload)["w"].std()) == pytest.approx(0.5 * 2 * 0.2, rel=0.01)
    assert plan.privacy.events == ((P.gaussian(0.5), 1),)


# ------------------------------------------------------------------ intrinsic (seed 000)
def test_intrinsic_integer_aggregation_equals_float_aggregation_in_a_round():
    alg, model, fed, plan = build(INTRINSIC)
    p = plan.privacy.details
    state = alg.init({k: v.detach().clone() for k, v in model.named_parameters()})
    update = alg.client(model_loss(model))
    cohort = list(range(len(fed.clients)))
    payloads, ints, aux = [], [], []
    for cid in cohort:
        b, mask, _ = draw_work(alg.draw, fed.clients[cid], cid, 1, 0, plan.work, state.params)
        res = update(state.params, {}, alg.broadcast(state), b, mask, rng.key(0, 1, cid, "client"))
        payload, _ = alg.uplink.encode(res.delta, (), rng.key(0, 1, cid, "uplink"))
        payloads.append(payload)
        ints.append(alg.uplink.decode(payload))
        aux.append(res.aux)
    for t in ints:  # the server receives integers
        assert all(torch.equal(v, v.round()) for v in t.values())
    stacked = {k: torch.stack([t[k] for t in ints]) for k in ints[0]}
    aux_s = {k: torch.stack([a[k] for a in aux]) for k in aux[0]}
    agg, _ = alg.server_fn(state, None, stacked, None, aux_s, 0, state.extra)
    # float path: the codec's ordinary decode (m * D_k - v), sample-weighted by N_k
    floats = dithered_quantize(p["step"], p["uniforms"], p["clip"], norm="linf")
    counts = aux_s["count"]
    for k in agg:
        ref = sum(c * floats.decode(pl)[k] for c, pl in zip(counts, payloads)) / counts.sum()
        torch.testing.assert_close(agg[k], -p["server_lr"] * ref, rtol=0, atol=1e-12)
    # and a simulated round applies exactly that aggregate (server sgd(1))
    res = run(INTRINSIC + ["rounds=1", "sampling.clients_per_round=6"], runtime=LoopRuntime())
    for k in agg:
        torch.testing.assert_close(res.state.params[k], state.params[k] + agg[k], rtol=0, atol=1e-12)


def test_intrinsic_vmap_equals_loop_and_declares_its_event():
    a = run(INTRINSIC, runtime=LoopRuntime())
    b = run(INTRINSIC, runtime=VmapRuntime(threads=1))
    for k in a.state.params:
        torch.testing.assert_close(a.state.params[k], b.state.params[k], rtol=0, atol=1e-9)
    assert [m["bytes_up"] for m in a.metrics] == [m["bytes_up"] for m in b.metrics]
    d = 64 * 10 + 10
    event = P.intrinsic_quantization(6, 20.0, 0.5, d, 0.1)
    acc = P.Accountant("pld")
    acc.step(event, 3)
    assert a.metrics[-1]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)


# ------------------------------------------------------------------ report
def test_report_and_compare_draw_privacy(tmp_path):
    from atoll.report import compare

    alg, model, fed, plan = build(DP_SGD + ["privacy.target_epsilon=2.3", "rounds=4"])
    simulate(alg, model, fed, plan, run_dir=tmp_path / "dp", plots=True)
    run([], run_dir=tmp_path / "plain")
    summary = (tmp_path / "dp" / "summary.md").read_text()
    assert "| privacy | ε = 2.229 at δ = 1e-05 (dp_sgd, per record; pld accountant, add_remove)" in summary
    assert "stopped after round 2" in summary and (tmp_path / "dp" / "plots" / "privacy.png").exists()
    import matplotlib.pyplot as plt

    seen = []
    orig = plt.subplots
    plt.subplots = lambda *a, **k: seen.append(a) or orig(*a, **k)
    try:
        compare([tmp_path / "dp", tmp_path / "plain"], tmp_path / "cmp", labels=["dp", "plain"])
    finally:
        plt.subplots = orig
    assert seen[-1] == (1, 5)  # round, loss, up, down, and accuracy against epsilon


# ------------------------------------------------------------------ configuration errors
@pytest.mark.parametrize("overrides, message", [
    (["privacy.mode=dp_fedavg", "privacy.noise_multiplier=1.0"], "sampling.method = \"poisson\""),
    (["privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0"], "privacy.sample_rate"),
    (["privacy.mode=dp_sgd", "privacy.sample_rate=0.1"], "privacy.noise_multiplier, or"),
    (["privacy.target_epsilon=1.0"], "privacy.mode is \"none\""),
    (["privacy.mode=dp_sgd", "privacy.sampel_rate=0.1"], "did you mean 'privacy.sample_rate'"),
    (["privacy.mode=secret"], "privacy.mode"),
    (["privacy.mode=intrinsic", "privacy.sample_rate=0.1"], "privacy.step"),
    (INTRINSIC + ["privacy.accountant=rdp"], "cannot account for"),
    (INTRINSIC + ["client.steps=3"], "one clipped gradient per round"),
    (["privacy.mode=dp_fedavg", "sampling.method=poisson", "sampling.rate=0.5",
      "privacy.noise_multiplier=2.0", "privacy.target_quantile=0.5",
      "privacy.clip_count_stddev=0.5"], "2 * stddev > noise_multiplier"),
    (DP_SGD + ["privacy.target_quantile=0.5"], "dp_fedavg"),
    (["privacy.mode=dp_sgd", "privacy.sample_rate=0.1", "privacy.target_epsilon=1",
      "privacy.accountant=rdp_classic"], "rdp_classic"),
])
def test_bad_privacy_configs_name_the_key(overrides, message):
    with pytest.raises(config.ConfigError, match=None) as info:
        build(overrides)
    assert message in str(info.value)
