"""A malicious server against SecAgg: the two attacks of Bonawitz et al. (CCS 2017, section 6)
that the semi-honest protocol does not stop, written as the server would run them. Each runs
against the semi-honest protocol (where it reads a client's input) and against
``[secure] malicious = true`` (``atoll.secure.active``), which refuses it with a named error."""
import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from atoll.secure import active as A
from atoll.secure import primitives as pr
from atoll.secure import secagg, shamir
from atoll.secure.secagg import SEED, Setup

SIM = A.Simulated(seed=3)

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


def parties(st, active):
    clients = {u: active.client(st, u) if active else secagg.Client(st, u) for u in st.clients}
    return clients, active.server(st) if active else secagg.Server(st)


def forged(st, adv, v, c_pk, s_pk, how):
    """What the server advertises as ``v``'s keys ``c_pk, s_pk`` (with ``active``): ``v``'s own
    signature and credential kept, or the server's own identity signing them, or the whole
    advertisement of another client replayed."""
    if len(adv[v]) == 2:
        return c_pk, s_pk
    if how == "keep":
        return c_pk, s_pk, *adv[v][2:]
    if how == "own":
        key = ec.generate_private_key(ec.SECP256R1())
        return c_pk, s_pk, A.sign(key, A.keys_message(st, v, c_pk, s_pk)), A._point(key.public_key())
    w = max(adv)  # a client the server itself runs: its keys and signature, named v
    return adv[w]


def mitm(st, x, active=None, how="keep", victim=0):
    """The server advertises its own keys to ``victim`` in place of each neighbour's, opens
    every share the victim seals, rebuilds its self-mask seed and strips the pair masks it agreed
    with the victim itself. Returns the victim's input as the server recovers it."""
    clients, server = parties(st, active)
    adv = {u: c.advertise() for u, c in clients.items()}
    keys = server.collect_keys(adv)
    fake = {v: (pr.keypair(), pr.keypair()) for v in keys[victim]}  # (c_sk, c_pk), (s_sk, s_pk)
    if how == "replay":  # the server runs client w: w's channel and mask keys are its own
        w = max(adv)
        fake = {v: ((clients[w].c_sk, adv[w][0]), (clients[w].s_sk, adv[w][1])) for v in fake}
    keys[victim] = {v: forged(st, adv, v, c[1], s[1], how) for v, (c, s) in fake.items()}
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


@pytest.mark.parametrize("how, why", [
    ("keep", "the keys advertised for client 1 are not signed by client 1's identity"),
    ("own", "the credential given for client 1 is not client 1's identity"),
    ("replay", "the credential given for client 1 is not client 1's identity")])
def test_signed_advertisements_refuse_the_swapped_keys(how, why):
    st = Setup.new(range(5), 1, 64, 16, malicious=True)
    with pytest.raises(A.SignatureError, match=f"client 0: refused: {why}"):
        mitm(st, inputs(st), SIM, how)


def split_views(st, x, group_a, corrupt, active=None, refusals=None, victim=0):
    """The server tells ``group_a`` that ``victim`` survived (they reveal shares of its
    self-mask seed b) and the other honest clients that it dropped (shares of its mask key s);
    the ``corrupt`` clients, the server's own, give both (and sign both survivor sets). Returns
    the victim's input as the server recovers it, or None where it gets fewer than ``threshold``
    shares of either kind; the honest clients' refusals go to ``refusals``."""
    clients, server = parties(st, active)
    adv = {u: c.advertise() for u, c in clients.items()}
    keys = server.collect_keys(adv)
    inbox = server.collect_shares({u: c.share(keys[u]) for u, c in clients.items()})
    y = {u: c.masked(x[u], inbox[u]) for u, c in clients.items()}
    server.collect_inputs(y)
    everyone = set(st.clients)
    views = {w: frozenset(everyone if w in group_a | corrupt | {victim} else everyone - {victim})
             for w in everyone}
    if active is not None:  # each honest client signs its view; the corrupt ones sign both
        signed = {(w, views[w]): clients[w].check(views[w]) for w in everyone - corrupt}
        signed.update({(w, view): A.sign(clients[w].identity.key, A.view_message(st, view))
                       for w in corrupt for view in set(views.values())})
        sigs = {w: {v: signed[(v, views[w])] for v in everyone - {w} if (v, views[w]) in signed}
                for w in everyone}
    got = {"b": {}, "s": {}}
    for w in sorted(everyone - {victim}):
        if w in corrupt:  # the server holds w's keys: both shares of the victim
            got["b"][st.x(w)], got["s"][st.x(w)] = opened(st, clients[w].c_sk, adv[victim][0],
                                                        inbox[w][victim], victim, w)
            continue
        ask = (everyone, set()) if w in group_a else (everyone - {victim}, {victim})
        try:
            out = clients[w].unmask(*ask, *([sigs[w]] if active else []))
        except secagg.SecAggError as exc:
            (refusals if refusals is not None else []).append(str(exc))
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


@pytest.mark.parametrize("threshold", [4, None])  # 4: the semi-honest default; None: 5 of 6
def test_the_consistency_check_refuses_every_split_of_the_survivor_view(threshold):
    st = Setup.new(range(7), 1, 64, 16, threshold=threshold, malicious=True)
    assert st.threshold == (threshold or 5)
    x = inputs(st)
    for r in range(5):
        for a in itertools.combinations([1, 2, 3, 4], r):
            refusals = []
            assert split_views(st, x, set(a), {5, 6}, SIM, refusals) is None, a
            if r in (0, 4):  # one view for all: only one kind of share of client 0 is revealed
                assert not refusals
                continue
            assert refusals and all("neighbours signed its survivor set, fewer than the threshold"
                                    in why for why in refusals), (a, refusals)


def test_a_request_against_the_signed_survivor_set_is_refused():
    st = Setup.new(range(5), 1, 8, 16, malicious=True)
    x = inputs(st)
    clients, server = parties(st, SIM)
    keys = server.collect_keys({u: c.advertise() for u, c in clients.items()})
    inbox = server.collect_shares({u: c.share(keys[u]) for u, c in clients.items()})
    requests = server.collect_inputs({u: c.masked(x[u], inbox[u]) for u, c in clients.items()})
    signed = {u: c.check(server.view()) for u, c in clients.items()}
    requests = server.collect_views(signed, requests)
    with pytest.raises(A.ConsistencyError, match="a second survivor set"):
        clients[0].check(server.view() - {4})
    survivors, _, sigs = requests[0]
    with pytest.raises(A.ConsistencyError, match=r"names \[4\] otherwise than the survivor set"):
        clients[0].unmask(survivors - {4}, {4}, sigs)
    with pytest.raises(A.ConsistencyError, match="2 neighbours signed"):
        clients[0].unmask(survivors, set(), {v: sigs[v] for v in (1, 2)})
    forged = {v: sigs[1] for v in sigs}  # one client's signature named as everyone's
    with pytest.raises(A.ConsistencyError, match="1 neighbours signed"):
        clients[0].unmask(survivors, set(), forged)
    assert set(clients[0].unmask(*requests[0])) == {1, 2, 3, 4} and not clients[0].revealed.keys() - {1, 2, 3, 4}


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_malicious_mode_keeps_the_sum_exact_under_dropout_at_every_stage(stage):
    n = 12
    st = Setup.new(range(n), stage, 32, 16, neighbours=8, malicious=True)  # t = 6 of 8
    assert st.threshold == 6
    gone = set(np.random.default_rng(stage).choice(n, size=2, replace=False).tolist())
    x = inputs(st, stage)
    total, survivors, clients, _ = secagg.run(st, x, drop={stage: gone}, active=SIM)
    assert survivors == (set(range(n)) - gone if stage <= 3 else set(range(n)))
    want = np.sum([x[u] for u in survivors], axis=0, dtype=np.uint64) & np.uint64((1 << st.bits) - 1)
    assert (total == want).all()
    graph = st.graph()  # every neighbour that advertised was verified before use
    for u, c in clients.items():
        if stage > 2 or u not in gone:
            assert set(c.ids) == graph[u] - (gone if stage == 1 else set()), u


def test_enrolment_certificates_are_checked_against_the_ca_and_the_claimed_id(tmp_path):
    from atoll.deploy import certs
    certs.init(tmp_path / "a")
    certs.init(tmp_path / "b")
    ca = (tmp_path / "a" / "ca.pem").read_bytes()
    pki = A.CertificatePKI(ca)
    one = certs.issue(tmp_path / "a", "alice", client_id=1)
    other = certs.issue(tmp_path / "b", "mallory", client_id=1)  # another CA, the same id
    der = {e["name"]: A.Identity.enrolled(open(e["cert"], "rb").read(), open(e["key"], "rb").read())
           for e in (one, other)}
    assert A._point(pki.public(1, der["alice"].credential)) == A._point(der["alice"].key.public_key())
    with pytest.raises(A.SignatureError, match="for client 2 is enrolled as client 1"):
        pki.public(2, der["alice"].credential)
    with pytest.raises(A.SignatureError, match="not one this deployment's CA signed"):
        pki.public(1, der["mallory"].credential)
    with pytest.raises(A.SignatureError, match="not in \\[1, 1024\\]"):
        pki.public(1, b"\0" * 1025)
    with pytest.raises(A.SignatureError, match="not one this deployment's CA signed"):
        pki.public(1, b"\x30\x03garbage")
    with pytest.raises(ValueError, match="not the P-256 key of its certificate"):
        A.Identity.enrolled(open(one["cert"], "rb").read(), open(other["key"], "rb").read())
    assert len(der["alice"].credential) <= A.CRED
