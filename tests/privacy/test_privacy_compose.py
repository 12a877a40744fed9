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


@pytest.mark.parametrize("algo", ["scaffold", "fedagrac", "fednova"])
@pytest.mark.parametrize("mode", [["privacy.mode=local", "privacy.noise_multiplier=2.0"],
                                  ["privacy.mode=dp_fedavg", "sampling.method=poisson",
                                   "sampling.rate=0.5", "privacy.noise_multiplier=1.0"]])
def test_algorithms_sending_aux_are_refused_with_the_reason(algo, mode):
    with pytest.raises(config.ConfigError, match=r"neither clips nor noises"):
        build(mode + [f"algorithm.name={algo}"])


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
