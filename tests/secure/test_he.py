"""Homomorphic sum (``atoll.secure.he``): weighted FedAvg from encrypted updates within 1e-6 of
plaintext, chunked layers, a key holder that decrypts only sums, threshold Paillier whose single
share decrypts nothing, hostile ciphertexts dropped with a reason, and the refusals."""
import struct
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")
pytest.importorskip("phe")

from atoll import config  # noqa: E402
from atoll.runtime.loop import LoopRuntime  # noqa: E402
from atoll.secure.he import HEError, HomomorphicSum  # noqa: E402
from atoll.simulation import simulate  # noqa: E402

from tests.secure.test_stage import BASE  # noqa: E402

STAGES = {"ckks": lambda: HomomorphicSum("ckks", max_weight=100.0),
          "paillier": lambda: HomomorphicSum("paillier", max_weight=100.0, key_bits=1024)}


def _cohort(like, k, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    rows = [{n: torch.randn(v.shape, generator=g, dtype=torch.float64) * scale for n, v in like.items()}
            for _ in range(k)]
    return rows, [int(x) for x in torch.randint(1, 101, (k,), generator=g)]


def _rel_err(mean, rows, ns):
    want = torch.cat([sum(n * r[k].reshape(-1) for r, n in zip(rows, ns)) / sum(ns) for k in mean])
    got = torch.cat([mean[k].reshape(-1) for k in mean])
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("scheme", ["ckks", "paillier"])
def test_weighted_mean_equals_plaintext_fedavg_within_1e6_relative(scheme):
    st = STAGES[scheme]()
    like = {"w": torch.zeros(7, 9, dtype=torch.float64), "b": torch.zeros(9, dtype=torch.float64)}
    rows, ns = _cohort(like, 5, seed=1)
    inputs = {c: st.encode(r, n, c) for c, (r, n) in enumerate(zip(rows, ns))}
    assert all(isinstance(v, bytes) for v in inputs.values())
    mean, stats = st.aggregate(inputs, 1, like)
    assert _rel_err(mean, rows, ns) < 1e-6
    assert stats["secure_survivors"] == 5 and stats["secure_rejected"] == []
    assert mean["w"].dtype == torch.float64 and mean["w"].shape == (7, 9)


def test_ckks_chunks_a_layer_larger_than_the_slot_count():
    st = STAGES["ckks"]()
    like = {"w": torch.zeros(10_000, dtype=torch.float64)}  # 10_001 values: 3 ciphertexts
    rows, ns = _cohort(like, 3, seed=2)
    inputs = {c: st.encode(r, n, c) for c, (r, n) in enumerate(zip(rows, ns))}
    assert struct.unpack_from("<I", inputs[0])[0] == 3
    mean, _ = st.aggregate(inputs, 1, like)
    assert _rel_err(mean, rows, ns) < 1e-6


def test_ckks_one_million_values():
    st = STAGES["ckks"]()
    like = {"a": torch.zeros(1000, 600, dtype=torch.float64), "b": torch.zeros(400_000, dtype=torch.float64)}
    rows, ns = _cohort(like, 3, seed=3)
    inputs = {c: st.encode(r, n, c) for c, (r, n) in enumerate(zip(rows, ns))}
    assert struct.unpack_from("<I", inputs[0])[0] == -(-1_000_001 // 4096)
    mean, _ = st.aggregate(inputs, 1, like)
    assert _rel_err(mean, rows, ns) < 1e-6


def test_paillier_one_share_alone_does_not_decrypt_all_shares_do():
    st = HomomorphicSum("paillier", max_weight=10.0, key_bits=1024, decryptors=3)
    p = st.holder._scheme
    plain = p.encode(np.array([0.25, -1.5, 3.0, 1.0]))  # w = 10 / 10 = 1, appended
    cts = p.parse(st.encode({"w": torch.tensor([0.25, -1.5, 3.0], dtype=torch.float64)}, 10, 0), 4)
    parts = [p.partial(s, cts) for s in p.shares]
    assert p.combine(parts) == plain
    for i in range(3):  # any one share, or any two of three, opens nothing (and is detected)
        for some in ([parts[i]], parts[:i] + parts[i + 1:]):
            with pytest.raises(ValueError, match="do not combine"):
                p.combine(some)
    assert p._priv is None  # no party holds the whole secret


def test_key_holder_decrypts_only_sums_once_per_round():
    st = STAGES["ckks"]()
    like = {"w": torch.zeros(4, dtype=torch.float64)}
    rows, ns = _cohort(like, 2, seed=4)
    inputs = {c: st.encode(r, n, c) for c, (r, n) in enumerate(zip(rows, ns))}
    with pytest.raises(HEError, match=">= 2 updates"):  # the server passes one client's ciphertext
        st.aggregate({0: inputs[0]}, 1, like)
    st.aggregate(inputs, 2, like)
    with pytest.raises(HEError, match="already decrypted round 2"):
        st.aggregate(inputs, 2, like)


def _hostile_ckks(st, honest):
    import tenseal as ts
    other = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 40])
    other.global_scale = 2.0 ** 30
    blob = ts.ckks_vector(other, [0.5] * 5).serialize()
    good = honest[0]
    short = st.holder.public.encrypt(np.zeros(3))  # a valid ciphertext of the wrong size
    return {10: b"garbage" * 9, 11: good[:-100], 12: struct.pack("<2I", 1, len(blob)) + blob,
            13: short, 14: struct.pack("<2I", 1, 2 ** 31) + b"x" * 50, 15: good + b"x"}


def _hostile_paillier(st, honest):
    good = honest[0]
    return {10: good[:-1], 11: good + b"\0", 12: b"\xff" * len(good), 13: b"\0" * len(good)}


@pytest.mark.parametrize("scheme", ["ckks", "paillier"])
def test_hostile_ciphertexts_are_dropped_with_a_reason_and_the_round_goes_on(scheme):
    st = STAGES[scheme]()
    like = {"w": torch.zeros(6, dtype=torch.float64)}
    rows, ns = _cohort(like, 3, seed=5)
    honest = {c: st.encode(r, n, c) for c, (r, n) in enumerate(zip(rows, ns))}
    bad = (_hostile_ckks if scheme == "ckks" else _hostile_paillier)(st, honest)
    mean, stats = st.aggregate({**honest, **bad}, 1, like)
    assert _rel_err(mean, rows, ns) < 1e-6  # the honest clients' mean, untouched
    assert stats["secure_survivors"] == 3
    assert sorted(c for c, _ in stats["secure_rejected"]) == sorted(bad)
    assert all(f"client {c}'s ciphertext dropped" in why for c, why in stats["secure_rejected"])


def _run(over):
    alg, model, fed, plan = config.build(config.load(text=BASE, overrides=list(over)))
    return simulate(alg, model, fed, plan, runtime=LoopRuntime(), plots=False)


def test_ckks_run_through_simulate_matches_the_plaintext_run():
    plain, he = _run([]), _run(["secure.method=ckks"])
    for k in plain.state.params:
        p, h = plain.state.params[k], he.state.params[k]
        assert float((p - h).abs().max()) <= 1e-6 * float(p.abs().max()), k
    acc = [r.metrics[-1]["test_acc"] for r in (plain, he)]
    assert abs(acc[0] - acc[1]) <= 1e-3
    assert he.metrics[-1]["secure_survivors"] == 8
    assert he.metrics[-1]["bytes_up"] == 8 * he.metrics[-1]["secure_bytes_up"]


@pytest.mark.parametrize("over, part", [
    (["aggregator.name=median"], "aggregator.name = 'median'"),
    (["algorithm.name=fednova"], "reads each client's aux on its own"),
    (["comm.uplink=top_k(0.1)"], "comm.uplink"),
    (["privacy.mode=local", "privacy.noise_multiplier=1.0"], "privacy.mode"),
    (["secure.dropout=0.2"], "SecAgg+'s"),
])
@pytest.mark.parametrize("method", ["ckks", "paillier"])
def test_what_an_encrypted_sum_hides_is_refused(method, over, part):
    with pytest.raises(config.ConfigError) as info:
        config.build(config.load(text=BASE, overrides=[f"secure.method={method}"] + over))
    assert part in str(info.value) and method in str(info.value)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ImportError, match=r"atoll\[he\]"):
        HomomorphicSum("ckks").holder
