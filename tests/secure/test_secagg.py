"""SecAgg+: exact sums under dropouts at every stage, the safety rule, and the primitives."""
import math
import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from atoll.secure import primitives as pr
from atoll.secure import secagg, shamir
from atoll.secure.secagg import SecAggError, Setup


def test_shamir_any_t_shares_rebuild_and_fewer_cannot():
    secret = os.urandom(32)
    xs = list(range(1, 9))
    shares = shamir.split(secret, xs, t=5)
    g = np.random.default_rng(0)
    for _ in range(10):
        pick = g.choice(xs, size=5, replace=False)
        assert shamir.combine({int(x): shares[int(x)] for x in pick}, 32, 5) == secret
    with pytest.raises(ValueError, match="4 shares cannot rebuild"):
        shamir.combine({x: shares[x] for x in xs[:4]}, 32, 5)
    # t - 1 shares are uniform whatever the secret: the first chunk's share values over many
    # sharings of two different secrets have the same (flat) distribution
    a = [shamir.split(b"\0" * 32, [1, 2, 3], 3)[1][0] for _ in range(2000)]
    b = [shamir.split(b"\xff" * 32, [1, 2, 3], 3)[1][0] for _ in range(2000)]
    for s in (a, b):
        assert abs(np.mean(s) / shamir.P - 0.5) < 0.03


def test_prg_known_answer_and_no_collisions():
    # AES-256 with the all-zero key on the all-zero block (FIPS-197 style vector)
    words = pr.prg(b"\0" * 32, 4, 32)
    assert np.asarray(words, dtype="<u4").tobytes().hex() == "dc95c078a2408989ad48a21492842087"
    # masks from distinct seeds differ (first 64 bits); 10^6 pairs in bench/secure_secagg.py
    seen = {pr.prg(os.urandom(32), 2, 32).tobytes() for _ in range(20_000)}
    assert len(seen) == 20_000
    low = pr.prg(os.urandom(32), 100_000, 5)
    assert low.max() < 32 and abs(low.mean() - 15.5) < 0.2  # uniform on the ring
    with pytest.raises(ValueError, match="bits must be in 1..32, got 33"):
        pr.prg(b"\0" * 32, 4, 33)
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        pr.prg(b"\0" * 31, 4, 8)


def test_pairwise_keys_agree_and_channels_bind_their_context():
    a_sk, a_pk = pr.keypair()
    b_sk, b_pk = pr.keypair()
    assert pr.agree(a_sk, b_pk, b"mask") == pr.agree(b_sk, a_pk, b"mask")
    assert pr.agree(a_sk, b_pk, b"mask") != pr.agree(a_sk, b_pk, b"channel")
    key = pr.agree(a_sk, b_pk, b"channel")
    ct = pr.seal(key, b"share", pr.aad(b"s" * 16, 3, 1, 2))
    assert pr.open_(key, ct, pr.aad(b"s" * 16, 3, 1, 2)) == b"share"
    for wrong in (pr.aad(b"s" * 16, 3, 1, 5), pr.aad(b"s" * 16, 4, 1, 2), pr.aad(b"t" * 16, 3, 1, 2)):
        with pytest.raises(InvalidTag):
            pr.open_(key, ct, wrong)


@pytest.mark.parametrize("bits", [1, 7, 21, 23, 25, 26, 32])
@pytest.mark.parametrize("d", [1, 7, 8, 9, 1001])
def test_bit_packing_round_trips_at_exactly_bits_per_value(bits, d):
    v = np.random.default_rng(bits).integers(0, 1 << bits, d, dtype=np.uint64)
    v[:1] = (1 << bits) - 1  # the top value of the ring too
    raw = pr.pack(v, bits)
    assert len(raw) == math.ceil(d * bits / 8)
    assert (pr.unpack(raw, d, bits) == v).all()


def reference_pack(values, bits):
    """The slow reference: each value's low ``bits`` bits as a bit matrix, packed row by row."""
    b = np.unpackbits(np.asarray(values).astype("<u4").view(np.uint8), bitorder="little").reshape(-1, 32)
    return np.packbits(b[:, :bits], bitorder="little").tobytes()


@pytest.mark.parametrize("bits", [1, 7, 8, 17, 23, 25, 31, 32])
@pytest.mark.parametrize("d", [0, 1, 7, 8, 9, 1001])
def test_the_fast_packing_gives_the_reference_bytes(bits, d):
    g = np.random.default_rng(bits * 1000 + d)
    for v in (g.integers(0, 1 << bits, d, dtype=np.uint64),
              g.integers(0, 1 << 32, d, dtype=np.uint64).astype(np.uint32),  # high bits dropped
              g.integers(-(1 << 40), 1 << 40, d, dtype=np.int64)):           # as astype wraps
        assert pr.pack(v, bits) == reference_pack(v, bits)


@pytest.mark.parametrize("bits", [17, 23, 32])
def test_the_masked_vector_is_the_reference_ring_sum_bit_for_bit(bits):
    # the uint32 in-place masking (add_prg) against the textbook sum of prg's ring elements in
    # uint64, with every neighbour's sign, packed by the reference packer: the same bytes
    st = Setup.new(range(7), 1, 1003, bits - 3, neighbours=4)
    x = {u: np.random.default_rng(u).integers(0, 1 << bits, st.d, dtype=np.uint64) for u in st.clients}
    clients = {u: secagg.Client(st, u) for u in st.clients}
    server = secagg.Server(st)
    keys = server.collect_keys({u: c.advertise() for u, c in clients.items()})
    inbox = server.collect_shares({u: c.share(keys[u]) for u, c in clients.items()})
    for u, c in clients.items():
        y = x[u] + pr.prg(c.b, st.d, bits)
        for v in sorted(c.peers):
            m = pr.prg(pr.agree(c.s_sk, c.peers[v][1], b"mask"), st.d, bits)
            y = y + m if u < v else y - m
        assert c.masked(x[u], inbox[u]) == reference_pack(y & np.uint64((1 << bits) - 1), bits)


def inputs(setup, seed=0):
    g = np.random.default_rng(seed)
    return {u: g.integers(0, 1 << 16, setup.d, dtype=np.uint64) for u in setup.clients}


def plain(x, who, bits):
    return np.sum([x[u] for u in who], axis=0, dtype=np.uint64) & np.uint64((1 << bits) - 1)


@pytest.mark.parametrize("n, k", [(6, None), (30, 8)])
def test_the_sum_is_exact_and_the_uplink_is_bit_packed(n, k):
    st = Setup.new(range(n), 1, 257, 16, neighbours=k)
    assert st.bits == 16 + math.ceil(math.log2(n))
    x = inputs(st)
    total, survivors, clients, _ = secagg.run(st, x)
    assert survivors == set(range(n)) and (total == plain(x, survivors, st.bits)).all()
    assert len(pr.pack(x[0], st.bits)) == math.ceil(257 * st.bits / 8)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_thirty_percent_dropout_at_any_stage_keeps_the_sum_exact(stage):
    for seed in range(4):
        n = 20
        st = Setup.new(range(n), seed, 64, 16, neighbours=14)  # t = 8: 6 drops leave >= 8
        g = np.random.default_rng(seed)
        gone = set(g.choice(n, size=6, replace=False).tolist())
        x = inputs(st, seed)
        total, survivors, _, _ = secagg.run(st, x, drop={stage: gone})
        expect = set(range(n)) - gone if stage <= 3 else set(range(n))
        assert survivors == expect  # dropping at stage 4 still counts their inputs
        assert (total == plain(x, survivors, st.bits)).all()


def test_below_threshold_the_round_fails_cleanly():
    st = Setup.new(range(10), 1, 16, 16, neighbours=4)  # t = 3 of 4 neighbours
    x = inputs(st)
    with pytest.raises(SecAggError, match="shares of client|threshold"):
        secagg.run(st, x, drop={4: set(range(2, 10))})


def _shared(n: int):
    """A session of ``n`` clients through stages 1 and 2: (setup, inputs, clients, server, inboxes)."""
    st = Setup.new(range(n), 1, 8, 16)
    x = inputs(st)
    clients = {u: secagg.Client(st, u) for u in st.clients}
    server = secagg.Server(st)
    keys = server.collect_keys({u: c.advertise() for u, c in clients.items()})
    return st, x, clients, server, server.collect_shares({u: c.share(keys[u]) for u, c in clients.items()})


def test_an_honest_client_never_reveals_both_shares_of_one_peer():
    st, x, clients, server, inbox = _shared(5)
    server.collect_inputs({u: c.masked(x[u], inbox[u]) for u, c in clients.items()})
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        clients[0].unmask({0, 1, 2, 3}, {3})
    clients[0].unmask({0, 1, 2, 3, 4}, set())  # b-shares of 1..4
    with pytest.raises(SecAggError, match="other share of \\[4\\] was revealed"):
        clients[0].unmask({0, 1, 2, 3}, {4})  # a second request now calls 4 dropped
    with pytest.raises(SecAggError, match="survivors, fewer than the threshold"):
        secagg.Client(st, 1).unmask({1}, set())


def test_a_client_refuses_inputs_outside_the_ring():
    st = Setup.new(range(4), 1, 8, 16)
    c = secagg.Client(st, 0)
    c.advertise()
    with pytest.raises(SecAggError, match="8 integers in"):
        c.masked(np.full(8, 1 << st.bits, dtype=np.uint64), {})


def test_hostile_bytes_are_refused_before_use():
    chunks = shamir.chunks_for(32)
    with pytest.raises(ValueError, match="must be 44 bytes"):
        shamir.from_bytes(b"\0" * 43, chunks)
    with pytest.raises(ValueError, match="outside the field"):
        shamir.from_bytes(b"\xff" * 44, chunks)
    with pytest.raises(ValueError, match="is 3 bytes, got 4"):
        pr.unpack(b"\0" * 4, 1, 23)  # a packed vector of the wrong length: refused, not read
    with pytest.raises(ValueError, match="public key must be 32 bytes"):
        pr.agree(pr.keypair()[0], b"\0" * 31, b"mask")
    with pytest.raises(ValueError, match="too short"):
        pr.open_(b"k" * 32, b"\0" * 10, b"")
    st, x, clients, server, inbox = _shared(5)
    bad = dict(inbox[0])
    bad[1] = bad[1][:-1] + bytes([bad[1][-1] ^ 1])  # a share tampered with on the way
    masked = {u: c.masked(x[u], bad if u == 0 else inbox[u]) for u, c in clients.items()}
    requests = server.collect_inputs(masked)
    out = clients[0].unmask(*requests[0])  # nothing of client 1's: its sealed share is forged
    assert set(out) == set(requests[0][0]) - {0, 1} and 1 not in clients[0].revealed
    with pytest.raises(ValueError, match="packed vector"):
        server.collect_inputs({0: b"\0" * 3})
