"""ECDH-PSI core: the result equals Python's set intersection; what each mode reveals."""
import random

import numpy as np
import pytest

from atoll.vertical import psi
from atoll.vertical.psi import intersect

try:  # tests/vertical without or with an __init__.py
    from psi_peer import Party, Script
except ImportError:
    from .psi_peer import Party, Script


def _sets(rng, n_a, n_b, common):
    pool = rng.sample(range(10**12), n_a + n_b - common)
    return pool[:n_a], pool[n_a - common:]


@pytest.mark.parametrize("n_a,n_b,common", [(0, 0, 0), (0, 50, 0), (40, 0, 0), (300, 200, 0),
                                            (300, 200, 57), (200, 200, 200), (1, 700, 1)])
def test_intersection_equals_python_sets(n_a, n_b, common):
    rng = random.Random(n_a * 1000 + n_b + common)
    a, b = _sets(rng, n_a, n_b, common)
    a = [str(x) for x in a]
    ra, rb = intersect(a, b, chunk=64)  # b as ints: 5 and "5" are the same id
    want = set(a) & {str(x) for x in b}
    assert set(ra.intersection) == want and ra.size == len(want) == common
    assert {str(x) for x in rb.intersection} == want and rb.size == common
    assert ra.intersection == [x for x in a if x in want]  # in the caller's order
    assert ra.peer_count == n_b and rb.peer_count == n_a


def test_duplicates_in_the_input_count_once():
    ra, rb = intersect(["a", "a", "b", b"c", "c"], ["c", "a", "a", "z"])
    assert ra.intersection == ["a", b"c"] and ra.size == 2  # the first spelling of an id is kept
    assert ra.peer_count == 3 and rb.peer_count == 3


def test_size_only_reveals_only_the_size():
    a, b = _sets(random.Random(5), 120, 90, 31)
    ra, rb = intersect(a, b, learn_a="size", learn_b="nothing")
    assert (ra.learned, ra.size, ra.intersection) == ("size", 31, None)
    assert (rb.learned, rb.size, rb.intersection) == ("nothing", None, None)
    # B sent nothing back for itself to compare: A's bytes out are its blinded set only
    assert ra.bytes_sent == 32 * 120 and rb.bytes_sent == 32 * (90 + 120)


def test_a_party_learns_at_most_what_the_peer_reveals():
    ra, rb = intersect(["x", "y"], ["y"], learn_a="intersection", learn_b="intersection",
                       reveal="size")
    assert ra.learned == rb.learned == "size" and ra.size == rb.size == 1


def _position_guess_accuracy(learn):
    """A peer that knows its own scalar guesses its items' membership from the positions of the
    doubly-blinded values the party sends back: exact when they come in order, chance when shuffled."""
    items = [f"i{k}" for k in range(200)]
    party = Party(items[:100] + [f"other{k}" for k in range(100)], reveal=learn)
    peer = Script(party, items, learn=learn, reveal="nothing")
    peer.send("blinded", peer.blinded())
    theirs = peer.receive("blinded", 200)                 # the party's blinded set
    back = peer.receive("reblinded", 200)                 # the peer's set, blinded by both
    mine_twice = set(np.frombuffer(psi.exponentiate(peer.scalar, theirs), "S32"))
    hit = np.array([v in mine_twice for v in np.frombuffer(back, "S32")])
    assert hit.sum() == 100                                # the size is right in both modes
    truth = np.arange(200) < 100                           # items 0..99 are the common ones
    party.join()
    return float((hit == truth).mean())


def test_size_mode_positions_tell_nothing():
    assert _position_guess_accuracy("intersection") == 1.0   # in order: positions are the answer
    assert _position_guess_accuracy("size") < 0.7            # shuffled: chance is 0.5 (sd 0.035)


def test_each_session_is_fresh_but_the_result_deterministic():
    a, b = ["p", "q", "r", "s"], ["q", "s", "t"]
    r1, _ = intersect(a, b)
    r2, _ = intersect(a, b)
    assert r1.intersection == r2.intersection == ["q", "s"]
    assert r1.session != r2.session                         # fresh nonces: a new session
    h1, h2 = psi.hash_to_group([b"q"], r1.session), psi.hash_to_group([b"q"], r2.session)
    assert h1 == psi.hash_to_group([b"q"], r1.session) and h1 != h2  # domain-separated hashing


def test_blinding_commutes_and_hashes_are_canonical():
    rng = random.Random(9)
    a, b = (bytes(rng.getrandbits(8) for _ in range(32)) for _ in range(2))
    u = psi.hash_to_group([f"x{k}".encode() for k in range(500)], b"s" * 32)
    psi.check_points(u, "hashes")                                 # top bit clear, below p
    ab = psi.exponentiate(b, psi.exponentiate(a, u))
    assert ab == psi.exponentiate(a, psi.exponentiate(b, u))
    assert len(set(np.frombuffer(ab, "S32"))) == 500


def test_workers_give_the_same_result():
    a, b = _sets(random.Random(3), 3000, 2500, 999)
    ra, _ = intersect(a, b, workers=2, chunk=512)
    assert sorted(ra.intersection) == sorted(set(a) & set(b))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="learn must be one of"):
        intersect(["a"], ["a"], learn_a="everything")
    with pytest.raises(TypeError, match="str, bytes or int"):
        psi.run_psi(None, [1.5])
