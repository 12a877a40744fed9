"""A malicious server against SecAgg: the two attacks of Bonawitz et al. (CCS 2017, section 6)
that the semi-honest protocol does not stop, written as the server would run them."""
import itertools

import numpy as np

from atoll.secure import primitives as pr
from atoll.secure import secagg, shamir
from atoll.secure.secagg import SEED, Setup

CHUNKS = shamir.chunks_for(SEED)


def inputs(st, seed=0):
    g = np.random.default_rng(seed)
    return {u: g.integers(0, 1 << 16, st.d, dtype=np.uint64) for u in st.clients}


def unmasked(st, y, b, s_of, others, me):
    """``y`` minus the self mask ``PRG(b)`` and the pair masks ``sign(me, v) PRG(s_of(v))``."""
    x = pr.unpack(y, st.d, st.bits) - pr.prg(b, st.d, st.bits)
    for v in others:
        m = pr.prg(s_of(v), st.d, st.bits)
        x = x - m if me < v else x + m
    return x & np.uint64((1 << st.bits) - 1)


def opened(st, channel_sk, sender_c_pk, ct, sender, receiver):
    """Both Shamir shares (b, s) in a sealed share message, opened with the receiver's key."""
    key = pr.agree(channel_sk, sender_c_pk, b"channel")
    body = pr.open_(key, ct, pr.aad(st.session, st.round, sender, receiver))
    half = len(body) // 2
    return shamir.from_bytes(body[:half], CHUNKS), shamir.from_bytes(body[half:], CHUNKS)


def mitm(st, x, victim=0):
    """The server advertises its own keys to ``victim`` in place of each neighbour's, opens
    every share the victim seals, rebuilds its self-mask seed and strips the pair masks it agreed
    with the victim itself. Returns the victim's input as the server recovers it."""
    clients = {u: secagg.Client(st, u) for u in st.clients}
    server = secagg.Server(st)
    adv = {u: c.advertise() for u, c in clients.items()}
    keys = server.collect_keys(adv)
    fake = {v: (pr.keypair(), pr.keypair()) for v in keys[victim]}  # (c_sk, c_pk), (s_sk, s_pk)
    keys[victim] = {v: (c[1], s[1], *adv[v][2:]) for v, (c, s) in fake.items()}
    sealed = {u: clients[u].share(keys[u]) for u in clients}
    inbox = server.collect_shares(sealed)
    y = clients[victim].masked(x[victim], inbox[victim])
    b = {st.x(v): opened(st, fake[v][0][0], adv[victim][0], ct, victim, v)[0]
         for v, ct in sealed[victim].items()}
    b = shamir.combine(b, SEED, st.threshold)
    return unmasked(st, y, b, lambda v: pr.agree(fake[v][1][0], adv[victim][1], b"mask"),
                    inbox[victim], victim)


def test_a_server_that_swaps_the_advertised_keys_reads_a_clients_input():
    st = Setup.new(range(5), 1, 64, 16)
    x = inputs(st)
    assert (mitm(st, x) == x[0]).all()  # semi-honest: the victim's input, bit for bit


def split_views(st, x, group_a, corrupt, victim=0):
    """The server tells ``group_a`` that ``victim`` survived (they reveal shares of its
    self-mask seed b) and the other honest clients that it dropped (shares of its mask key s);
    the ``corrupt`` clients, the server's own, give both. Returns the victim's input as the
    server recovers it, or None where it gets fewer than ``threshold`` shares of either kind."""
    clients = {u: secagg.Client(st, u) for u in st.clients}
    server = secagg.Server(st)
    adv = {u: c.advertise() for u, c in clients.items()}
    keys = server.collect_keys(adv)
    inbox = server.collect_shares({u: c.share(keys[u]) for u, c in clients.items()})
    y = {u: c.masked(x[u], inbox[u]) for u, c in clients.items()}
    server.collect_inputs(y)
    everyone = set(st.clients)
    got = {"b": {}, "s": {}}
    for w in sorted(everyone - {victim}):
        if w in corrupt:  # the server holds w's keys: both shares of the victim
            got["b"][st.x(w)], got["s"][st.x(w)] = opened(st, clients[w].c_sk, adv[victim][0],
                                                        inbox[w][victim], victim, w)
            continue
        ask = (everyone, set()) if w in group_a else (everyone - {victim}, {victim})
        try:
            out = clients[w].unmask(*ask)
        except secagg.SecAggError:
            continue
        kind, raw = out[victim]
        got[kind][st.x(w)] = shamir.from_bytes(raw, CHUNKS)
    if min(len(got["b"]), len(got["s"])) < st.threshold:
        return None
    b, s_sk = (shamir.combine(got[k], SEED, st.threshold) for k in ("b", "s"))
    return unmasked(st, y[victim], b, lambda v: pr.agree(s_sk, adv[v][1], b"mask"),
                    everyone - {victim}, victim)


def test_a_server_with_two_clients_that_splits_the_survivor_view_reads_a_clients_input():
    st = Setup.new(range(7), 1, 64, 16)  # complete graph, threshold 4 of 6
    assert st.threshold == 4
    x = inputs(st)
    honest = [1, 2, 3, 4]
    wins = [a for r in range(5) for a in itertools.combinations(honest, r)
            if (lambda got: got is not None and (got == x[0]).all())(split_views(st, x, set(a), {5, 6}))]
    assert wins == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]  # every even split
