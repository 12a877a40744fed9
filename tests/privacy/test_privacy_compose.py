"""Privacy modes composed with the rest of a run (issue 13): noise only through [privacy] (so it
is always accounted), Laplace local DP, compressed uplinks after the noise, dp_fedavg re-clipping
what it decodes, and the algorithms no mode can protect refused with the reason."""
import math

import pytest
import torch

from atoll import config
from atoll import privacy as P
from atoll.algorithms.dp import dp_fedavg_server
from atoll.simulation import simulate
from atoll.types import ServerState

from tests.privacy.test_privacy_run import BASE, DP_SGD, build


def run(over):
    alg, model, fed, plan = build(over)
    return simulate(alg, model, fed, plan, plots=False)


def test_noise_in_comm_uplink_is_refused_not_left_unaccounted():
    """Before: this run added Laplace noise and printed no epsilon at all."""
    with pytest.raises(config.ConfigError, match="nothing here would account"):
        build(['comm.uplink=clip_linf(0.01)+laplace_noise(1.0, 6.5)'])


@pytest.mark.parametrize("rel", ["add_remove", "replace_one"])
def test_local_laplace_is_pure_dp_per_round(rel):
    res = run(["privacy.mode=local", "privacy.mechanism=laplace", "privacy.clip=0.5",
               "privacy.noise_multiplier=4.0", f"privacy.neighboring={rel}"])
    # Laplace of scale b x 2C after an L1 clip to C: 1/b per round, 3 rounds: 0.75 (pure DP)
    assert res.metrics[-1]["epsilon"] == pytest.approx(3 / 4.0, abs=2e-3)
    assert res.final["privacy"]["mechanism"] == "laplace"


def test_local_laplace_calibrates_to_the_target():
    res = run(["privacy.mode=local", "privacy.mechanism=laplace", "privacy.target_epsilon=1.5"])
    assert res.state.round == 3
    assert 0.99 * 1.5 < res.metrics[-1]["epsilon"] <= 1.5


@pytest.mark.parametrize("mode", [["privacy.mode=local", "privacy.noise_multiplier=2.0"], DP_SGD])
def test_dp_modes_compose_with_a_compressed_uplink(mode):
    plain, compressed = run(mode), run(mode + ["comm.uplink=top_k(0.1)"])
    assert compressed.metrics[-1]["bytes_up"] < 0.5 * plain.metrics[-1]["bytes_up"]
    # compression after the noise is post-processing: the same events, the same epsilon
    assert compressed.metrics[-1]["epsilon"] == plain.metrics[-1]["epsilon"] > 0


def test_dp_fedavg_composes_with_a_quantizer_and_reclips_what_it_decodes():
    over = ["privacy.mode=dp_fedavg", "sampling.method=poisson", "sampling.rate=0.5",
            "privacy.noise_multiplier=1.0"]
    res = run(over + ["comm.uplink=stochastic_quantize(2)"])
    assert res.state.round == 3 and math.isfinite(res.metrics[-1]["epsilon"])
    server = dp_fedavg_server(2.0, 0.0, None, None, 0.2, reclip=True)
    deltas = {"w": torch.tensor([[30.0, 40.0], [0.3, 0.4]], dtype=torch.float64)}
    extra = {"broadcast": {"dp": {"clip": torch.tensor([1.0], dtype=torch.float64)}}}
    state = ServerState({"w": torch.zeros(2, dtype=torch.float64)}, (), 0, extra)
    out, _ = server(state, None, deltas, None, {}, 0, extra)
    # row 0 (norm 50, as a codec could inflate it) counts as norm 1; row 1 as it is
    assert torch.allclose(out["w"], (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])).double() / 2)


ALGOS = [["algorithm.name=scaffold"], ["algorithm.name=fedagrac"],
         ["algorithm.name=fedagrac", "algorithm.form=published"], ["algorithm.name=fednova"]]


@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: "-".join(x.split("=")[1] for x in a))
def test_dp_sgd_is_the_estimator_of_every_client_half(algo):
    """DP-SGD is the gradient estimator SCAFFOLD's, FedaGrac's and FedNova's step loops run on,
    so their aux is post-processing of DP releases: accounted like FedAvg's. Before, refused."""
    ref = run(DP_SGD)
    res = run(DP_SGD + algo)
    assert res.metrics[-1]["epsilon"] == ref.metrics[-1]["epsilon"] > 0
    # the estimator really is DP-SGD's: with a tiny clip and no noise nothing moves
    alg, model, fed, plan = build(algo)
    init = alg.init({k: v.detach() for k, v in model.named_parameters()})
    tiny = run(["privacy.mode=dp_sgd", "privacy.sample_rate=0.1", "privacy.noise_multiplier=0.0",
                "privacy.clip=1e-9"] + algo)
    plain = run(algo)
    for k in init.params:
        assert float((tiny.state.params[k] - init.params[k]).abs().max()) < 1e-6
        assert float((plain.state.params[k] - init.params[k]).abs().max()) > 1e-3


LOCAL = ["privacy.mode=local", "privacy.noise_multiplier=2.0"]
DP_FEDAVG = ["privacy.mode=dp_fedavg", "sampling.method=poisson", "sampling.rate=0.5",
             "privacy.noise_multiplier=1.0"]


@pytest.mark.parametrize("algo", ["scaffold", "fedagrac"])
@pytest.mark.parametrize("mode", [LOCAL, DP_FEDAVG], ids=["local", "dp_fedavg"])
@pytest.mark.parametrize("uplink", [[], ["comm.uplink=top_k(0.1)"]], ids=["plain", "top_k"])
def test_dp_modes_protect_the_aux_of_scaffold_and_fedagrac(algo, mode, uplink):
    """The aux (control variates, gradients) is clipped and noised with the delta: the same
    events, so the same epsilon as FedAvg's. Before: refused ("neither clips nor noises")."""
    ref = run(mode)
    res = run(mode + uplink + [f"algorithm.name={algo}", "privacy.aux_clip=2.0"])
    assert res.state.round == 3
    assert res.metrics[-1]["epsilon"] == ref.metrics[-1]["epsilon"] > 0
    shared = res.state.extra["broadcast"]["c" if algo == "scaffold" else "vtilde"]
    assert all(bool(torch.isfinite(v).all()) for v in shared.values())
    assert sum(float(v.abs().sum()) for v in shared.values()) > 0
    assert res.final["privacy"]["aux_clip"] == 2.0


def _aux_probe(state, agg, mean, cohort, extra):
    return agg, {**extra, "probe": (mean, cohort)}


def test_dp_fedavg_reclips_the_aux_and_hands_its_noisy_mean_over_the_fixed_cohort():
    server = dp_fedavg_server(2.0, 0.0, None, None, 0.2, aux_ratio=2.0, server_aux=_aux_probe)
    deltas = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    aux = {"c": torch.tensor([[30.0, 40.0], [0.3, 0.4]], dtype=torch.float64)}
    extra = {"broadcast": {"dp": {"clip": torch.tensor([1.0], dtype=torch.float64)}}}
    state = ServerState({"w": torch.zeros(2, dtype=torch.float64)}, (), 0, extra)
    _, out = server(state, None, deltas, None, aux, 0, extra)
    mean, cohort = out["probe"]
    # a client that sends an aux of norm 50 counts as norm 2 (= aux_clip): the server re-clips
    assert torch.allclose(mean["c"], torch.tensor([1.2 + 0.3, 1.6 + 0.4], dtype=torch.float64) / 2)
    assert cohort == 2.0  # the expected cohort, never the number that came


def test_dp_fedavg_noise_on_delta_and_aux_has_the_joint_scale():
    d, z, clip, ratio = 40_000, 0.7, 0.5, 3.0
    server = dp_fedavg_server(4.0, z, None, None, 0.2, aux_ratio=ratio, server_aux=_aux_probe)
    zeros = {"w": torch.zeros(1, d, dtype=torch.float64)}
    extra = {"broadcast": {"dp": {"clip": torch.tensor([clip], dtype=torch.float64)}}}
    state = ServerState({"w": torch.zeros(d, dtype=torch.float64)}, (), 0, extra)
    agg, out = server(state, None, zeros, None, {"c": zeros["w"]}, 7, extra)
    # the pair (delta, aux / ratio) has sensitivity clip sqrt(2); each part's noise scales with its clip
    want = z * clip * math.sqrt(2) / 4.0
    assert float(agg["w"].std()) == pytest.approx(want, rel=0.03)
    assert float(out["probe"][0]["c"].std()) == pytest.approx(want * ratio, rel=0.03)


@pytest.mark.parametrize("laplace", [False, True])
def test_local_mode_clips_and_noises_the_aux_on_the_client(laplace):
    over = LOCAL + ["algorithm.name=scaffold", "privacy.clip=0.5", "privacy.aux_clip=1.5"]
    alg = build(over + (["privacy.mechanism=laplace"] if laplace else []))[0]
    d = 40_000
    zeros = {"w": torch.zeros(d, dtype=torch.float64)}
    # (delta, aux * 0.5 / 1.5) moves by 2 x 0.5 in each part: 2 x 2 x 0.5 in L1, 2 x 0.5 sqrt 2 in L2
    joint = 2 * 2 * 0.5 if laplace else 2 * math.sqrt(2) * 0.5
    for codec, own in ((alg.uplink, 1.0), (alg.aux_codec, 1.5 / 0.5)):
        noisy, _ = codec.encode(zeros, codec.init(zeros), 11)
        std = 2.0 * math.sqrt(2) * joint if laplace else 2.0 * joint  # Laplace(b s): std b s sqrt 2
        assert float(noisy["w"].std()) == pytest.approx(std * own, rel=0.03)
    assert alg.aux_codec.event == alg.uplink.event  # one release of the pair, one event
    big = {"w": torch.full((d,), 10.0, dtype=torch.float64)}
    enc = lambda tree: alg.aux_codec.encode(tree, alg.aux_codec.init(tree), 11)[0]["w"]  # noqa: E731
    clipped = enc(big) - enc(zeros)
    norm = clipped.abs().sum() if laplace else clipped.norm()
    assert float(norm) == pytest.approx(1.5, rel=1e-9)  # the aux clip, before the same noise


@pytest.mark.parametrize("runtime", ["loop", "vmap"])
def test_every_runtime_sends_the_aux_through_the_aux_codec(runtime):
    """SCAFFOLD's global control variate is the mean of what the clients sent: with a tiny
    aux clip (and next to no noise) it stays tiny in every runtime; with a large one it moves."""
    from atoll.runtime.loop import LoopRuntime
    from atoll.runtime.vmap import VmapRuntime

    def c_size(aux_clip):
        over = ["privacy.mode=local", "privacy.noise_multiplier=1e-12", "algorithm.name=scaffold",
                f"privacy.aux_clip={aux_clip}"]
        rt = LoopRuntime() if runtime == "loop" else VmapRuntime(threads=1, chunk_clients=4)
        res = run_on(over, rt)
        return max(float(v.abs().max()) for v in res.state.extra["broadcast"]["c"].values())

    assert c_size(1e-9) < 1e-8 < 1e-2 < c_size(100.0)


def run_on(over, runtime):
    alg, model, fed, plan = build(over)
    return simulate(alg, model, fed, plan, runtime=runtime, plots=False)


@pytest.mark.parametrize("algo", [["algorithm.name=fednova"],
                                  ["algorithm.name=fedagrac", "algorithm.form=published"]])
@pytest.mark.parametrize("mode", [LOCAL, DP_FEDAVG], ids=["local", "dp_fedavg"])
def test_server_steps_reading_each_clients_aux_are_refused_with_the_reason(algo, mode):
    with pytest.raises(config.ConfigError, match=r"reads each client's update or aux"):
        build(mode + algo)


def test_aux_clip_without_aux_is_refused():
    with pytest.raises(config.ConfigError, match="aux_clip applies to algorithms that send aux"):
        build(LOCAL + ["privacy.aux_clip=1.0"])


def test_intrinsic_is_its_own_uplink():
    from tests.privacy.test_privacy_run import INTRINSIC

    with pytest.raises(config.ConfigError, match="is itself the uplink codec"):
        build(INTRINSIC + ["comm.uplink=top_k(0.1)"])


@pytest.mark.parametrize("over, message", [
    (DP_SGD + ["privacy.mechanism=laplace"], "applies to mode \"local\" only"),
    (["privacy.mechanism=laplace"], "privacy.mode is \"none\""),
    (["privacy.mode=local", "privacy.mechanism=laplace", "privacy.noise_multiplier=1.0",
      "privacy.norm=l2"], "clips each update in L1"),
    (DP_SGD + ["privacy.norm=l1"], "l1"),
])
def test_mechanism_and_norm_misuse_is_named(over, message):
    with pytest.raises(config.ConfigError, match=None) as info:
        build(over)
    assert message in str(info.value)


def test_laplace_calibration_meets_tiny_and_large_targets():
    for target in (0.01, 1.0, 20.0):
        b = P.noise_for_epsilon(target, 1.0, 10, 1e-5, mechanism="laplace")
        acc = P.Accountant("pld")
        acc.step(P.laplace(b), 10)
        assert acc.epsilon(1e-5) <= target
        # (epsilon, 1e-5) needs no more noise than pure DP's T / epsilon
        assert b <= 10 / target * (1 + 1e-3)


# ------------------------------------------------ the accountant reads the assembled stages' events
def _configure(over, alter):
    """``privacy_config.configure`` on the algorithm ``build(over)`` assembles, altered first."""
    import dataclasses

    from atoll.privacy_config import configure

    cfg = config.load(text=BASE, overrides=list(over))
    alg, model, fed, plan = build([o for o in over if not o.startswith("privacy.")])
    return configure(cfg, alter(alg, dataclasses), model, fed, dataclasses.replace(plan, privacy=None))


def _noisy(alg, dc):
    from atoll.codecs import chain, gaussian_noise

    return dc.replace(alg, uplink=chain(alg.uplink, gaussian_noise(3.0, 1.0)))


def test_a_noise_stage_with_no_privacy_mode_is_refused_naming_it():
    """Before: an algorithm whose uplink adds noise ran with privacy.mode = "none": noise that
    no accountant charged and no epsilon printed."""
    with pytest.raises(config.ConfigError, match="its uplink adds privacy noise"):
        _configure([], _noisy)


def test_the_events_are_the_stages_events_so_an_added_noise_stage_is_charged():
    _, plan = _configure(LOCAL, lambda alg, dc: alg)
    assert plan.privacy.events == ((P.gaussian(2.0), 1),)
    # a noise stage put into the algorithm (here before the mode wraps it) is read and charged
    _, plan = _configure(LOCAL, _noisy)
    assert sorted(e.noise_multiplier for e, _ in plan.privacy.events) == [2.0, 3.0]


@pytest.mark.parametrize("over, events, client", [
    (LOCAL, [(P.gaussian(2.0), 1)], True),
    (LOCAL + ["privacy.neighboring=replace_one"], [(P.gaussian(4.0), 1)], True),  # 2C either way
    (DP_SGD, [(P.poisson_gaussian(0.1, 1.0), 2)], True),     # one event per local step
    (DP_FEDAVG, [(P.poisson_gaussian(0.5, 1.0), 1)], False),  # the server's noise
])
def test_each_modes_events_come_from_its_stages(over, events, client):
    alg, _, _, plan = build(over)
    assert list(plan.privacy.events) == events
    # a deployed client's ledger charges only its own stages' noise: none under dp_fedavg
    assert list(plan.privacy.client_events) == (events if client else [])
    assert (alg.server_event is not None) == (not client)
