"""Compression codecs: round trips, unbiasedness, exactness, linearity, error feedback, byte sizes
against independent predictions and a bit-by-bit reference coder, chains, registry, bad input."""
import math

import pytest
import torch
from torch.utils._pytree import tree_flatten

from atoll import codecs, rng
from atoll.codecs import bits, flat, sparse_index
from atoll.codecs import sketch as S  # the module (the package exports count_sketch)
from atoll.codecs.sparsify import sample
from atoll.runtime.store import ClientStore
from atoll.transport import wire


def _gen(seed):
    return torch.Generator().manual_seed(seed)


TREE = {"layer.w": torch.randn(40, 30, generator=_gen(0)),
        "layer.b": torch.randn(30, generator=_gen(1), dtype=torch.float64),
        "steps": torch.tensor([3, 4], dtype=torch.int64),          # not floating: passed through
        "half": torch.randn(7, generator=_gen(2)).to(torch.float16)}
FLOATS = [k for k in TREE if TREE[k].is_floating_point()]
D = sum(TREE[k].numel() for k in FLOATS)

ALL = [codecs.cast("float16"), codecs.cast("bfloat16"), codecs.stochastic_quantize(4),
       codecs.stochastic_quantize(1, bucket=7), codecs.top_k(0.05), codecs.rand_k(0.1),
       codecs.rand_k(0.1, masked=True), codecs.count_sketch(3, 64), codecs.count_sketch(4, 64, k=10),
       codecs.error_feedback(codecs.top_k(0.1)),
       codecs.chain(codecs.top_k(0.1), codecs.stochastic_quantize(4)),
       codecs.chain(codecs.rand_k(0.2), codecs.cast("bfloat16")),
       codecs.chain(codecs.rand_k(0.2, masked=True), codecs.count_sketch(5, 100))]


def _round_trip(codec, tree, key=7, state=None):
    payload, state = codec.encode(tree, codec.init(tree) if state is None else state, key)
    data = wire.dumps(payload)
    assert flat.wire_size(payload) == len(data)
    back = codec.decode(wire.loads(data))
    assert list(back) == list(tree)  # names and order
    for k in tree:
        assert back[k].shape == tree[k].shape and back[k].dtype == tree[k].dtype, k
    return back, payload, data, state


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
def test_round_trip_keeps_names_shapes_dtypes_and_is_deterministic(codec):
    back, payload, data, _ = _round_trip(codec, TREE)
    assert torch.equal(back["steps"], TREE["steps"])
    assert data == wire.dumps(codec.encode(TREE, codec.init(TREE), 7)[0])  # same key, same bytes
    empty = {"x": torch.zeros(0), "n": torch.tensor([1])}
    assert torch.equal(_round_trip(codec, empty)[0]["n"], empty["n"])


def test_cast_rounds_to_nearest_and_clamps():
    back = _round_trip(codecs.cast("float16"), TREE)[0]
    assert torch.equal(back["layer.w"], TREE["layer.w"].half().float())
    assert torch.equal(back["half"], TREE["half"])
    back = _round_trip(codecs.cast(torch.bfloat16), TREE)[0]
    assert torch.equal(back["layer.b"], TREE["layer.b"].bfloat16().double())
    big = _round_trip(codecs.cast("float16"), {"x": torch.tensor([1e6, -1e9, 1.0])})[0]["x"]
    assert big.tolist() == [65504.0, -65504.0, 1.0]


def _stats_bound(values: torch.Tensor, target: torch.Tensor, std: torch.Tensor, z=5.0):
    """Every coordinate's mean over the draws lies within ``z`` standard errors of the target."""
    n = values.shape[0]
    err = (values.mean(0) - target).abs()
    assert bool((err <= z * std / math.sqrt(n) + 1e-12).all()), float((err / (std / math.sqrt(n))).max())


def test_stochastic_quantize_is_unbiased_on_its_grid():
    x = torch.cat([torch.randn(128, generator=_gen(3)) * 5, torch.randn(64, generator=_gen(4)) * 1e-3,
                   torch.zeros(64), torch.tensor([2.5])]).double()  # buckets of 64 with very different scales
    codec = codecs.stochastic_quantize(3, bucket=64)
    draws = torch.stack([codec.decode(codec.encode({"x": x}, (), rng.key(0, r, 0, "t"))[0])["x"]
                         for r in range(1500)])
    s = torch.stack([b.abs().max() for b in x.split(64)]).repeat_interleave(64)[:x.numel()]
    step = 2 * s / 7
    levels = (draws + s) / torch.where(step > 0, step, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-6)  # on the grid
    assert bool(((draws - x).abs() <= step * (1 + 1e-9)).all())  # one of the two neighbours
    _stats_bound(draws, x, step / 2)  # variance <= (step/2)^2
    assert torch.equal(draws[:, 192:256], torch.zeros(1500, 64))  # an all-zero bucket stays zero
    assert codec.unbiased and not codec.linear


def test_rand_k_is_unbiased_and_uniform():
    x = torch.randn(200, generator=_gen(5), dtype=torch.float64)
    codec = codecs.rand_k(0.1)
    n = 2000
    draws = torch.stack([codec.decode(codec.encode({"x": x}, (), rng.key(1, r, 0, "t"))[0])["x"]
                         for r in range(n)])
    assert bool(((draws != 0).sum(1) == 20).all())
    _stats_bound(draws, x, x.abs() * math.sqrt(200 / 20 - 1))
    freq = (draws != 0).double().mean(0)  # inclusion probability k/d = 0.1 for every coordinate
    assert float((freq - 0.1).abs().max()) < 5 * math.sqrt(0.1 * 0.9 / n)
    payload = codec.encode({"x": x}, (), 3)[0]
    assert payload["randk/seed"].numel() == 1 and payload["randk/v"].numel() == 20
    assert codec.unbiased and not codec.linear


@pytest.mark.parametrize("d,k", [(1000, 10), (1000, 250), (1000, 251), (1000, 1000), (5, 1)])
def test_rand_k_sample_gives_k_distinct_sorted_indices(d, k):
    for s in range(20):
        idx = sample(s, d, k)
        assert idx.numel() == k and torch.equal(idx, idx.unique()) and 0 <= int(idx.min()) and int(idx.max()) < d


def test_top_k_keeps_exactly_the_largest():
    x = torch.randn(1000, generator=_gen(6))
    for fraction, k in ((0.01, 10), (0.123, 123), (1.0, 1000), (1e-9, 1)):
        back, payload, _, _ = _round_trip(codecs.top_k(fraction), {"x": x})
        keep = x.abs().argsort(descending=True)[:k]
        expected = torch.zeros_like(x)
        expected[keep] = x[keep]
        assert torch.equal(back["x"], expected)
        assert payload["topk/v"].numel() == k


def test_top_k_selects_globally_across_leaves():
    tree = {"small": torch.full((50,), 0.1), "big": torch.arange(1.0, 51.0)}
    back = _round_trip(codecs.top_k(0.2), tree)[0]  # k = 20: all from "big"
    assert torch.equal(back["small"], torch.zeros(50)) and int((back["big"] != 0).sum()) == 20


def _reference_rice(idx: list[int], m: int) -> tuple[bytes, bytes]:
    """Bit by bit in plain Python: unary quotients (q ones, a zero; 1-padded) and m-bit remainders
    (0-padded), LSB first."""
    unary, rem, prev = [], [], -1
    for i in idx:
        g = i - prev - 1
        prev = i
        unary += [1] * (g >> m) + [0]
        rem += [(g >> j) & 1 for j in range(m)]
    def pack(stream, pad):
        stream = stream + [pad] * (-len(stream) % 8)
        return bytes(sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8))
    return pack(unary, 1), pack(rem, 0)


def _best_m(idx: list[int]) -> int:
    g = [b - a - 1 for a, b in zip([-1] + idx[:-1], idx)]
    costs = [len(g) * (m + 1) + sum(x >> m for x in g) for m in range(40)]
    return costs.index(min(costs))


@pytest.mark.parametrize("d,k,clustered", [(10_000, 100, False), (10_000, 3000, False), (10_000, 10_000, False),
                                           (100_000, 500, True), (50, 1, False), (50, 0, False)])
def test_index_streams_match_reference_coder(d, k, clustered):
    g = _gen(d + k)
    if clustered:  # runs of neighbouring coordinates, as top-k of a layer gives
        starts = torch.randperm(d - 20, generator=g)[: k // 10]
        idx = (starts[:, None] + torch.arange(10)).reshape(-1).unique()
    else:
        idx = torch.randperm(d, generator=g)[:k].sort().values
    entries = sparse_index.encode(idx, "p")
    m = int(entries["p/m"][0])
    if k:
        assert m == _best_m(idx.tolist())  # the 7-candidate window finds the best parameter
    unary, rem = _reference_rice(idx.tolist(), m)
    assert entries["p/q"].numpy().tobytes() == unary and entries["p/r"].numpy().tobytes() == rem
    assert sparse_index.encoded_size(idx) == len(unary) + len(rem) + 1
    assert torch.equal(sparse_index.decode(entries, "p", idx.numel(), d, "t"), idx)
    if k >= 100 and not clustered and k < d:
        assert 8 * (len(unary) + len(rem)) / k <= math.log2(d / k) + 2.2  # bits per index


def test_index_stream_errors_are_clear():
    entries = sparse_index.encode(torch.tensor([3, 9, 40]), "p")
    for wrong in (2, 4):
        with pytest.raises(ValueError, match=f"does not hold exactly {wrong} indices"):
            sparse_index.decode(entries, "p", wrong, 100, "top_k")
    with pytest.raises(ValueError, match="out of range"):
        sparse_index.decode(entries, "p", 3, 40, "top_k")
    with pytest.raises(ValueError, match="missing the index entry 'p/r'"):
        sparse_index.decode({"p/q": entries["p/q"], "p/m": entries["p/m"]}, "p", 3, 100, "top_k")
    with pytest.raises(ValueError, match="strictly increasing"):
        sparse_index.encode(torch.tensor([3, 3]), "p")


def test_count_sketch_is_linear_and_sums_decode_once():
    a = torch.randn(5000, generator=_gen(7), dtype=torch.float64)
    b = torch.randn(5000, generator=_gen(8), dtype=torch.float64)
    torch.testing.assert_close(S.sketch(a, 5, 300) + S.sketch(b, 5, 300), S.sketch(a + b, 5, 300),
                               rtol=0, atol=1e-12)
    codec = codecs.count_sketch(5, 300, k=50)
    pa, pb = (codec.encode({"x": v}, (), i)[0] for i, v in enumerate((a, b)))
    summed = codecs.sum_payloads([pa, pb], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(summed["sketch/t"], S.sketch(0.25 * a + 0.75 * b, 5, 300), rtol=0, atol=1e-12)
    torch.testing.assert_close(codec.decode(summed)["x"], S.unsketch(S.sketch(0.25 * a + 0.75 * b, 5, 300), 5000, 50),
                               rtol=0, atol=1e-12)
    assert codec.linear and not codec.unbiased
    other = codecs.count_sketch(5, 300, seed=1).encode({"x": a}, (), 0)[0]  # another seed: other hashes
    assert not torch.allclose(other["sketch/t"], pa["sketch/t"])
    with pytest.raises(ValueError, match="differs"):
        codecs.sum_payloads([pa, codecs.count_sketch(5, 300).encode({"y": a}, (), 0)[0]])


def test_count_sketch_recovers_heavy_hitters_from_a_sum_of_clients():
    d, heavy = 200_000, 30
    g = _gen(9)
    where = torch.randperm(d, generator=g)[:heavy]
    big = torch.zeros(d)
    big[where] = (torch.rand(heavy, generator=g) * 10 + 10) * torch.sign(torch.randn(heavy, generator=g))
    clients = [big / 4 + 0.01 * torch.randn(d, generator=g) for _ in range(4)]  # each holds a quarter
    codec = codecs.count_sketch(7, 3000, k=heavy)  # 21,000 floats for 200,000 coordinates
    summed = codecs.sum_payloads([codec.encode({"x": c}, (), i)[0] for i, c in enumerate(clients)])
    out = codec.decode(summed)["x"]
    assert set(torch.nonzero(out).reshape(-1).tolist()) == set(where.tolist())
    assert float((out[where] - sum(clients)[where]).abs().max()) < 0.5  # noise norm / sqrt(cols) ~ 0.16
    # median over rows matches torch.median (odd rows) and the middle mean (even rows)
    x = torch.randn(5, 333, generator=g)
    assert torch.equal(S._median_rows(x), x.median(0).values)
    x = torch.randn(4, 333, generator=g)
    assert torch.allclose(S._median_rows(x), x.sort(0).values[1:3].mean(0))


def _decoded_mean(codec, x, rounds, per_round):
    """The decoded estimate of ``x`` averaged over ``rounds`` rounds of ``codec``."""
    total = torch.zeros_like(x)
    for r in range(rounds):
        c = codecs.for_round(codec, rng.key(0, r, rng.SERVER, "uplink")) if per_round else codec
        total += c.decode(c.encode({"x": x}, (), r)[0])["x"]
    return total / rounds


@pytest.mark.parametrize("estimator", ["median", "mean"])
def test_count_sketch_collision_bias_averages_out_over_rounds(estimator):
    """Seed 004 asks for unbiased linear compression: with hashes drawn per round a coordinate's
    collision error is fresh noise every round, so the decoded estimate averaged over rounds
    tends to x (error ~ 1/sqrt(rounds)); one fixed seed repeats the same error: a bias."""
    x = torch.randn(4000, generator=_gen(11), dtype=torch.float64)
    size = float(x.abs().mean())
    fixed = codecs.count_sketch(5, 400, seed=0, estimator=estimator)
    bias_fixed = float((_decoded_mean(fixed, x, 20, True) - x).abs().mean())
    codec = codecs.count_sketch(5, 400, estimator=estimator)  # default: hashes per round
    bias = [float((_decoded_mean(codec, x, n, True) - x).abs().mean()) for n in (25, 400)]
    assert bias_fixed > 0.5 * size                # a permanent error as large as x itself
    assert bias[1] < 0.35 * bias[0] and bias[1] < 0.15 * size


def test_count_sketch_clients_of_a_round_share_hashes_rounds_do_not():
    a, b = (torch.randn(3000, generator=_gen(i), dtype=torch.float64) for i in (12, 13))
    codec = codecs.chain(codecs.count_sketch(5, 200))
    r1, r2 = (codecs.for_round(codec, rng.key(0, r, rng.SERVER, "uplink")) for r in (1, 2))
    st = codec.init({"x": a})
    pa, pb = r1.encode({"x": a}, st, 5)[0], r1.encode({"x": b}, st, 6)[0]  # two clients, round 1
    summed = codecs.sum_payloads([pa, pb])
    torch.testing.assert_close(r1.decode(summed)["x"], r1.decode(r1.encode({"x": a + b}, st, 7)[0])["x"],
                               rtol=0, atol=1e-12)
    assert int(pa["sketch/seed"][0]) != int(r2.encode({"x": a}, st, 5)[0]["sketch/seed"][0])
    with pytest.raises(ValueError, match="differs"):
        codecs.sum_payloads([pa, r2.encode({"x": b}, st, 6)[0]])
    key = rng.key(0, 1, rng.SERVER, "uplink")
    fb = codecs.error_feedback(codecs.count_sketch(5, 200))   # wrappers pass the round on
    seed = codecs.for_round(fb, key).encode({"x": a}, fb.init({"x": a}), 5)[0]["sketch/seed"]
    assert torch.equal(seed, codecs.for_round(codecs.count_sketch(5, 200), key).encode({"x": a}, (), 5)[0]["sketch/seed"])
    assert int(seed[0]) != 0
    fixed = codecs.count_sketch(5, 200, seed=3)
    assert codecs.for_round(fixed, 99) is fixed
    with pytest.raises(ValueError, match="seed"):
        fixed.decode({**fixed.encode({"x": a}, (), 0)[0], "sketch/seed": torch.tensor([4])})


def test_count_sketch_hashes_are_balanced_and_signs_fair():
    bucket, sign = S.hashes(100_000, 3, 1000, 0)
    g = rng.generator(rng.fold(0, "count_sketch"))   # the plain formula, out of place
    a, b, c, e = torch.randint(-2**63, 2**63 - 1, (4, 3, 1), generator=g, dtype=torch.int64)
    i = torch.arange(100_000, dtype=torch.int64)
    assert torch.equal(bucket, (((((a | 1) * i + b) >> 32) & 0xFFFFFFFF) * 1000) >> 32)
    assert torch.equal(sign, ((((c | 1) * i + e) >> 63) & 1).to(torch.int8) * 2 - 1)
    counts = torch.stack([torch.bincount(r, minlength=1000) for r in bucket]).double()
    assert int(bucket.min()) == 0 and int(bucket.max()) == 999
    assert float((counts - 100).abs().max()) < 5 * 10  # within 5 Poisson sd of the mean load
    assert abs(float(sign.double().mean())) < 0.01


def test_error_feedback_loses_nothing_and_state_stacks():
    params = {"w": torch.zeros(30, 20, dtype=torch.float64), "b": torch.zeros(20, dtype=torch.float64)}
    codec = codecs.error_feedback(codecs.chain(codecs.top_k(0.05), codecs.stochastic_quantize(2, 64)))
    state = codec.init(params)
    total_in = {k: torch.zeros_like(v) for k, v in params.items()}
    total_out = {k: torch.zeros_like(v) for k, v in params.items()}
    for r in range(25):
        update = {k: torch.randn(v.shape, generator=_gen(100 + r), dtype=torch.float64) for k, v in params.items()}
        payload, state = codec.encode(update, state, rng.key(0, r, 0, "uplink"))
        sent = codec.decode(wire.loads(wire.dumps(payload)))
        for k in params:
            total_in[k] += update[k]
            total_out[k] += sent[k]
    for k in params:
        torch.testing.assert_close(total_out[k] + state["residual"][k], total_in[k], rtol=0, atol=1e-10)
    assert float(state["residual"]["w"].abs().sum()) > 0  # something was held back
    leaves, _ = tree_flatten(state)
    assert leaves and all(isinstance(t, torch.Tensor) for t in leaves)
    store = ClientStore(4, codec.init(params))
    stacked = {"residual": {k: v[None] for k, v in state["residual"].items()}, "inner": ((), ())}
    store.put([2], stacked)
    got = store.get([2, 3])
    assert torch.equal(got["residual"]["w"][0], state["residual"]["w"]) and not got["residual"]["w"][1].any()
    with pytest.raises(ValueError, match="first in a chain"):
        codec.encode({"other": torch.zeros(3, dtype=torch.float64)}, state, 0)


def _entry(name, shape, itemsize):
    """Wire bytes of one entry: u16 name length, name, u8 dtype, u8 ndim, u32 per dim, data."""
    return 2 + len(name) + 2 + 4 * len(shape) + math.prod(shape) * itemsize


def _records(prefix, tree):
    return sum(_entry(f"{prefix}:{k}", (0, *tree[k].shape), 0) for k in FLOATS) + _entry("steps", (2,), 8)


def test_payload_bytes_equal_predictions():
    head = 8  # magic, version, count
    itemsize = 8  # TREE's floats promote to float64
    cases = {
        codecs.cast("float16"): _records("cast", TREE) + _entry("cast/v", (D,), 2),
        codecs.stochastic_quantize(3, 100): _records("sq", TREE) + _entry("sq/q", (math.ceil(D * 3 / 8),), 1)
        + _entry("sq/s", (math.ceil(D / 100),), 4),
        codecs.rand_k(0.1): _records("randk", TREE) + _entry("randk/seed", (1,), 8)
        + _entry("randk/v", (round(0.1 * D),), itemsize),
        codecs.count_sketch(3, 50): _records("sketch", TREE) + _entry("sketch/t", (3, 50), itemsize)
        + _entry("sketch/seed", (1,), 8),
    }
    for codec, predicted in cases.items():
        assert len(wire.dumps(codec.encode(TREE, (), 1)[0])) == head + predicted, codec.name
    k = round(0.05 * D)
    payload = codecs.top_k(0.05).encode(TREE, (), 1)[0]
    vec = torch.cat([TREE[n].double().reshape(-1) for n in FLOATS])
    idx = vec.abs().argsort(descending=True)[:k].sort().values.tolist()
    unary, rem = _reference_rice(idx, _best_m(idx))
    predicted = (_records("topk", TREE) + _entry("topk/q", (len(unary),), 1) + _entry("topk/r", (len(rem),), 1)
                 + _entry("topk/m", (1,), 1) + _entry("topk/v", (k,), itemsize))
    assert len(wire.dumps(payload)) == head + predicted


def test_compression_ratios_on_a_model_sized_tree():
    g = _gen(10)
    tree = {"fc1.weight": torch.randn(200, 784, generator=g) * 0.01, "fc1.bias": torch.randn(200, generator=g),
            "fc2.weight": torch.randn(10, 200, generator=g) * 0.1, "fc2.bias": torch.randn(10, generator=g)}
    dense = len(wire.dumps(tree))
    ratio = {c.name: dense / len(wire.dumps(c.encode(tree, c.init(tree), 0)[0])) for c in (
        codecs.cast("float16"), codecs.stochastic_quantize(4), codecs.top_k(0.01), codecs.rand_k(0.01),
        codecs.chain(codecs.top_k(0.01), codecs.stochastic_quantize(4)), codecs.count_sketch(5, 2000))}
    assert 1.99 < ratio["cast(float16)"] <= 2.0
    assert 7.5 < ratio["stochastic_quantize(4,512)"] < 8.0
    assert ratio["top_k(0.01)"] > 70  # 4-byte value + ~9 bits of index per kept coordinate
    assert ratio["rand_k(0.01)"] > 95  # values only, plus one 8-byte seed
    assert ratio["top_k(0.01)+stochastic_quantize(4,512)"] > 200
    assert 15.5 < ratio["count_sketch(5,2000)"] < 16


def test_chains_compose():
    x = {"x": torch.randn(2000, generator=_gen(11))}
    tk = codecs.top_k(0.05)
    both = codecs.chain(tk, codecs.stochastic_quantize(4))
    p1, p2 = tk.encode(x, (), 0)[0], both.encode(x, both.init(x), 0)[0]
    assert torch.equal(p2["topk/q"], p1["topk/q"]) and "topk/v" not in p2 and "sq:topk/v" in p2
    back = both.decode(p2)["x"]
    assert set(torch.nonzero(back).reshape(-1).tolist()) <= set(torch.nonzero(tk.decode(p1)["x"]).reshape(-1).tolist())
    half = codecs.chain(tk, codecs.cast("float16"))
    assert torch.equal(half.decode(half.encode(x, half.init(x), 0)[0])["x"], tk.decode(p1)["x"].half().float())
    assert len(wire.dumps(p2)) < len(wire.dumps(p1)) / 2
    lin = codecs.chain(codecs.rand_k(0.1, masked=True), codecs.count_sketch(3, 100))
    assert lin.linear and not both.linear and not both.unbiased
    assert codecs.chain(codecs.rand_k(0.1), codecs.stochastic_quantize(4)).unbiased
    with pytest.raises(ValueError, match="twice in a chain"):
        codecs.chain(tk, tk).encode(x, ((), ()), 0)


def test_bad_arguments_and_payloads_raise_clear_errors():
    for make, match in [(lambda: codecs.top_k(0), "fraction"), (lambda: codecs.top_k(1.5), "fraction"),
                        (lambda: codecs.rand_k(-0.1), "fraction"), (lambda: codecs.stochastic_quantize(0), "bits"),
                        (lambda: codecs.stochastic_quantize(17), "bits"),
                        (lambda: codecs.stochastic_quantize(4, bucket=0), "bucket"),
                        (lambda: codecs.cast("int8"), "dtype"), (lambda: codecs.count_sketch(0, 5), "rows"),
                        (lambda: codecs.count_sketch(2, 5, k=0), "k"), (lambda: codecs.error_feedback("top_k"), "Codec")]:
        with pytest.raises(ValueError, match=match):
            make()
    x = {"x": torch.randn(100, generator=_gen(12))}
    sq = codecs.stochastic_quantize(4, 10)
    p = sq.encode(x, (), 0)[0]
    with pytest.raises(ValueError, match="missing the entry 'sq/s'"):
        sq.decode({k: v for k, v in p.items() if k != "sq/s"})
    with pytest.raises(ValueError, match="9 scales"):
        sq.decode({**p, "sq/s": p["sq/s"][:9]})
    cs = codecs.count_sketch(3, 20)
    with pytest.raises(ValueError, match=r"table must be floating \(3, 20\)"):
        cs.decode({**cs.encode(x, (), 0)[0], "sketch/t": torch.zeros(3, 21)})
    with pytest.raises(ValueError, match="must be torch.int64"):
        rk = codecs.rand_k(0.1)
        rk.decode({**rk.encode(x, (), 0)[0], "randk/seed": torch.zeros(1)})


def test_registry_builds_strings_tables_and_lists():
    c = codecs.build_codec("error_feedback(top_k(0.01) + stochastic_quantize(4, bucket=256))")
    assert c.name == "error_feedback(top_k(0.01)+stochastic_quantize(4,256))"
    assert codecs.build_codec("cast(bfloat16)").name == "cast(bfloat16)"
    assert codecs.build_codec("identity").name == "identity"
    assert codecs.build_codec(["rand_k(0.1, masked=True)", {"name": "count_sketch", "rows": 5, "cols": 100}]).linear
    t = codecs.build_codec({"name": "error_feedback", "inner": [{"name": "top_k", "fraction": 0.1}, "cast"]})
    assert t.name == "error_feedback(top_k(0.1)+cast(float16))"
    for spec, match in [("topk(0.1)", r"unknown codec 'topk' \(did you mean 'top_k'\?\)"),
                        ("top_k(0.1, 2)", r"top_k\(fraction: float\): too many positional"),
                        ("top_k(0.1) * 2", "joined by '\\+'"), ("top_k(", "not valid"),
                        ("top_k(0.1 * 2)", "not a literal"), ({"fraction": 1}, "no 'name'"), (3, "string, a table"),
                        ("top_k(2.0)", "fraction must be in")]:
        with pytest.raises(ValueError, match=match):
            codecs.build_codec(spec)


@pytest.mark.parametrize("b", [4, 6, 16, 24, 62])
def test_pack_fast_paths_match_reference(b):
    g = _gen(b)
    for n in (0, 1, 7, 33):
        v = torch.randint(0, 2 ** min(b, 62), (n,), generator=g, dtype=torch.int64)
        stream = [(int(x) >> j) & 1 for x in v for j in range(b)]
        stream += [0] * (-len(stream) % 8)
        ref = bytes(sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8))
        assert bits.pack(v, b).numpy().tobytes() == ref
        assert torch.equal(bits.unpack(bits.pack(v, b), b, n), v)


def test_count_sketch_mean_estimator_decodes_linearly():
    """With the mean estimator, decoding each sketch and averaging equals decoding the
    weighted sum of the tables once (what FetchSGD's server or a secure sum computes)."""
    from atoll.codecs.sketch import count_sketch, sum_payloads

    g = torch.Generator().manual_seed(5)
    codec = count_sketch(3, 50, estimator="mean")
    trees = [{"w": torch.randn(40, 7, generator=g, dtype=torch.float64)} for _ in range(4)]
    payloads = [codec.encode(t, (), 0)[0] for t in trees]
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    once = codec.decode(sum_payloads(payloads, w))["w"]
    each = sum(wi * codec.decode(p)["w"] for wi, p in zip(w, payloads))
    assert torch.allclose(once, each, atol=1e-12)
    median = count_sketch(3, 50)
    assert not torch.allclose(median.decode(sum_payloads(payloads, w))["w"],
                              sum(wi * median.decode(p)["w"] for wi, p in zip(w, payloads)))
    with pytest.raises(ValueError, match="estimator"):
        count_sketch(3, 50, estimator="max")
