"""``runtime.check``: the server's validation of an uplink message, and every algorithm's
``aux_spec`` telling the truth (an honest client's aux always passes it)."""
import json
import math
import struct

import pytest
import torch

from atoll import config
from atoll import tree as T
from atoll.client import model_loss
from atoll.runtime.check import check_aux, decode_update
from atoll.runtime.loop import LoopRuntime
from atoll.simulation import _append
from atoll.transport import wire

BASE = """
rounds = 1
[data]
name = "digits"
num_clients = 3
[model]
hidden = [8]
[client]
batch_size = 64
"""
ALGORITHMS = [["algorithm.name=" + a] for a in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi",
                                                "fedadagrad", "fednova", "scaffold", "fedagrac")]
PRIVACY = [
    ["privacy.mode=dp_fedavg", "privacy.noise_multiplier=1.0", "privacy.target_quantile=0.5",
     "sampling.method=poisson", "sampling.rate=0.5", "privacy.clip_count_stddev=1.0"],
    ["privacy.mode=dp_sgd", "privacy.sample_rate=0.1", "privacy.noise_multiplier=1.0"],
    ["privacy.mode=intrinsic", "privacy.sample_rate=0.1", "privacy.step=20.0", "privacy.uniforms=5",
     "privacy.clip=0.5", "client.steps=1"],
    ["algorithm.name=fednova", "client.momentum=0.9"],
]


@pytest.mark.parametrize("over", ALGORITHMS + PRIVACY, ids=lambda o: ",".join(o))
def test_honest_updates_pass_the_check_for_every_algorithm(over):
    alg, model, data, plan = config.build(config.load(text=BASE, overrides=over))
    state = alg.init(T.clone(dict(model.named_parameters())))
    update = alg.client(model_loss(model))
    _, _, stats = LoopRuntime().run_round(alg, update, state, {}, [0, 1, 2], data, plan.work, plan.seed)
    assert stats.failures == [] and stats.succeeded == 3


def test_check_aux_names_what_is_wrong():
    spec = {"a": ((), None, 1.0, math.inf), "s": ((), torch.int64, -math.inf, math.inf)}
    good = {"a": torch.tensor(3.0, dtype=torch.float64), "s": torch.tensor(5)}
    out = check_aux(good, spec, torch.float32, "x")
    assert out["a"].dtype == torch.float32 and int(out["s"]) == 5
    cases = [({"a": good["a"]}, "aux has entries ['a'], x expects ['a', 's']"),
             ({**good, "a": torch.ones(2)}, "aux entry 'a' has shape (2,), expected ()"),
             ({**good, "a": torch.tensor(2)}, "aux entry 'a' has dtype torch.int64, expected a floating dtype"),
             ({**good, "s": torch.tensor(5.0)}, "aux entry 's' has dtype torch.float32, expected torch.int64"),
             ({**good, "a": torch.tensor(math.nan)}, "aux entry 'a' is not finite (NaN or inf)"),
             ({**good, "a": torch.tensor(1e300, dtype=torch.float64)}, "aux entry 'a' is not finite (NaN or inf)"),
             ({**good, "a": torch.tensor(0.5)}, "aux entry 'a' has a value 0.5 below 1")]
    for aux, why in cases:
        with pytest.raises(ValueError) as err:
            check_aux(aux, spec, torch.float32, "x")
        assert str(err.value) == why


def test_decode_update_turns_any_decoder_error_into_a_rejection():
    alg, model, _, _ = config.build(config.load(text=BASE, overrides=["comm.uplink=cast(float16)"]))
    params = dict(model.named_parameters())
    payload, _ = alg.uplink.encode(T.detach(params), (), 0)
    payload["cast/v"] = payload["cast/v"][:3]  # records cover more than the values sent
    with pytest.raises(ValueError, match="records cover more than the 3 coordinates"):
        decode_update(alg, wire.dumps(T.join({"delta": payload, "aux": {}})), params)
    entry = struct.pack("<H", 1) + b"a" + struct.pack("<BBI", 0, 1, 1)  # "a": float32 (1,)
    twice = wire.MAGIC + struct.pack("<BI", 1, 2) + entry * 2 + torch.ones(2).numpy().tobytes()
    with pytest.raises(wire.WireError, match="entry 'a' appears twice"):
        wire.loads(twice)


def test_metrics_lines_stay_json_when_a_number_is_not_finite(tmp_path):
    _append(tmp_path / "m.jsonl", {"round": 1, "train_loss": math.nan, "x": [math.inf, 1.5]})
    line = (tmp_path / "m.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
        "round": 1, "train_loss": None, "x": [None, 1.5]}
