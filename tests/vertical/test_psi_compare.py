"""The fast paths of ECDH-PSI against slow references: membership and duplicate search on
32-byte values (exact even when values share their first 8 bytes), and a party's messages are
the same bytes whatever the number of worker processes or the chunking of the work."""
import hashlib
import itertools
import random

import numpy as np
import pytest

from atoll.vertical import psi, psi_group

try:  # tests/vertical without or with an __init__.py
    from psi_peer import Party, Script
except ImportError:
    from .psi_peer import Party, Script


def _values(rng, n, prefix=None):
    """n random 32-byte values; with ``prefix`` all share their first 8 bytes."""
    return [(prefix or rng.randbytes(8)) + rng.randbytes(24) for _ in range(n)]


def _cases():
    rng = random.Random(4)
    common = _values(rng, 300)
    tied = _values(rng, 40, prefix=b"\x07" * 8)  # same first 8 bytes, different rest
    return [
        ([], []), ([], common), (common, []),
        (_values(rng, 500) + common[:100], common + _values(rng, 200)),
        (common[:50] * 3 + _values(rng, 20), common),           # duplicates in the data
        (tied[:20] + common[:10], tied[20:21] + common),        # data ties a reference prefix
        (tied[:25] + common[:10], tied[10:] + common),          # reference ties: the exact slow path
        (tied, tied[::-1]),
    ]


@pytest.mark.parametrize("data,ref", _cases())
def test_member_equals_a_python_set(data, ref):
    rng = random.Random(len(data) * 7 + len(ref))
    rng.shuffle(data)
    got = psi_group.member(b"".join(data), b"".join(ref))
    assert got.dtype == bool and got.tolist() == [v in set(ref) for v in data]


def _first_repeats(values):
    """The indices of values that occurred earlier (a slow reference)."""
    seen, out = set(), set()
    for i, v in enumerate(values):
        if v in seen:
            out.add(i)
        seen.add(v)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_first_duplicate_equals_a_slow_search(seed):
    rng = random.Random(seed)
    tied = _values(rng, 30, prefix=rng.randbytes(8))
    values = _values(rng, 400) + tied
    if seed % 2:                                         # odd seeds: plant duplicates
        values += rng.sample(values, 1 + seed) + rng.sample(tied, 2)
    rng.shuffle(values)
    got, repeats = psi_group.first_duplicate(b"".join(values)), _first_repeats(values)
    assert (got is None) == (not repeats) and (got is None or got in repeats)
    a, b = tied[:2]                                      # A, B, A under one 8-byte prefix
    assert psi_group.first_duplicate(a + b + a) == 2 and psi_group.first_duplicate(b"") is None


def _transcript(monkeypatch, workers, chunk):
    """Everything a party sends (its blinded set, then the peer's set reblinded) with its
    secrets drawn from a fixed stream, against a scripted peer with a fixed nonce and scalar."""
    count = itertools.count()
    monkeypatch.setattr(psi_group, "fresh", lambda n: hashlib.shake_256(b"%d" % next(count)).digest(n))
    a, b = [f"a{k}" for k in range(700)], [f"a{k}" for k in range(300, 1200)]
    party = Party(a, workers=workers, chunk=chunk)
    peer = Script(party, b, nonce=b"n" * 32, scalar=b"s" * 32)
    peer.send("blinded", peer.blinded())
    blinded = peer.receive("blinded", len(a))
    peer.send("reblinded", psi.exponentiate(peer.scalar, blinded))
    reblinded = b"".join(m.data for m in peer.messages())
    party.join()
    assert party.error is None and party.result.intersection == a[300:]
    return blinded, reblinded


def test_workers_and_chunks_send_the_same_bytes(monkeypatch):
    one = _transcript(monkeypatch, 1, 256)
    assert len(one[0]) == 700 * 32 and len(one[1]) == 900 * 32
    assert _transcript(monkeypatch, 2, 100) == one
    assert _transcript(monkeypatch, 3, 1000) == one
