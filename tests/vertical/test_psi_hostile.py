"""A hostile PSI peer: each attack ends with a PsiError that names what was wrong, no hang."""
import tracemalloc

import pytest

from atoll.vertical import psi
from atoll.vertical.psi import MAX_CHUNK, Message

try:  # tests/vertical without or with an __init__.py
    from psi_peer import ORDER8, P, Party, Script, u_bytes
except ImportError:
    from .psi_peer import ORDER8, P, Party, Script, u_bytes

ITEMS = [f"id{k}" for k in range(10)]


def attacked(party_kw=None, **script_kw):
    party = Party(ITEMS, **(party_kw or {}))
    return party, Script(party, ITEMS, **script_kw)


def refused(party, match):
    party.join()
    assert isinstance(party.error, psi.PsiError), party.error
    assert party.result is None
    assert match in str(party.error), str(party.error)
    return str(party.error)


def test_wrong_length_chunk():
    party, peer = attacked()
    peer.send("blinded", peer.blinded()[:-1])
    refused(party, "a chunk of 319 bytes")


@pytest.mark.parametrize("u", [0, 1, ORDER8, P - 1])
def test_low_order_point(u):
    party, peer = attacked()
    bad = bytearray(peer.blinded())
    bad[3 * 32:4 * 32] = u_bytes(u)
    peer.send("blinded", bytes(bad))
    refused(party, "the peer's value 3 is a low-order point")
    # the party told the peer why it stopped
    assert any(m.kind == "error" and b"low-order" in m.data for m in peer.messages())


@pytest.mark.parametrize("how", ["top bit", "u = p"])
def test_non_canonical_encoding(how):
    party, peer = attacked()
    bad = bytearray(peer.blinded())
    if how == "top bit":  # the same point under a second encoding: would dodge the duplicate check
        bad[5 * 32 + 31] |= 0x80
    else:
        bad[5 * 32:6 * 32] = u_bytes(P)
    peer.send("blinded", bytes(bad))
    refused(party, "value 5 is not a canonical X25519 u-coordinate")


def test_more_values_than_announced():
    party, peer = attacked(count=9)
    peer.send("blinded", peer.blinded())  # 10 values
    refused(party, "more than the 9 values it announced")


def test_oversized_chunk():
    party = Party(ITEMS)
    peer = Script(party, [f"x{k}" for k in range(MAX_CHUNK + 1)])
    peer.send("blinded", b"\x09" * 32 * (MAX_CHUNK + 1))
    refused(party, f"a chunk of {32 * (MAX_CHUNK + 1)} bytes")


def test_huge_announcement_is_refused_before_anything_is_allocated():
    tracemalloc.start()
    try:
        party = Party(ITEMS, max_items=1000)
        Script(party, ITEMS, count=2**62)
        party.join()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    refused(party, f"announces {2**62} items; this party accepts 0 to 1000")
    assert peak < 4 << 20


def test_duplicate_values():
    party, peer = attacked()
    data = peer.blinded()
    peer.send("blinded", data[:9 * 32] + data[:32])
    refused(party, "value 9 is a duplicate")


def _montgomery_add(u1, u2):
    """u(P1 + P2) on Curve25519 (affine, y from a square root; either sign gives a twin)."""
    A = 486662

    def y_of(u):
        y2 = (u**3 + A * u * u + u) % P
        y = pow(y2, (P + 3) // 8, P)
        if (y * y - y2) % P:
            y = y * pow(2, (P - 1) // 4, P) % P
        assert (y * y - y2) % P == 0, "u is not on the curve"
        return y
    y1, y2 = y_of(u1), y_of(u2)
    lam = (y2 - y1) * pow(u2 - u1, P - 2, P) % P
    return (lam * lam - A - u1 - u2) % P


def test_same_point_plus_a_low_order_point():
    party, peer = attacked()
    data = peer.blinded()
    for k in range(10):  # a blinded value on the curve (not the twist)
        u = int.from_bytes(data[32 * k:32 * k + 32], "little")
        try:
            twin = _montgomery_add(u, ORDER8)
            break
        except AssertionError:
            continue
    peer.send("blinded", data[:9 * 32] + u_bytes(twin))
    refused(party, "differ by a low-order point")


def test_replayed_session_is_refused_or_useless():
    party1, peer1 = attacked()
    old, old_session = peer1.blinded(), peer1.session
    peer1.send("blinded", old)
    peer1.receive("blinded", 10)
    peer1.receive("reblinded", 10)
    party1.thread.join(1)  # it waits for its own reblinded values; let it time out in the background

    party, peer = attacked()
    peer.send("blinded", old, session=old_session)
    refused(party, "a replay from another session?")

    party, peer = attacked()  # the old values under the new session's id: no match at all
    peer.send("blinded", old)
    theirs = peer.receive("blinded", 10)
    peer.receive("reblinded", 10)
    peer.send("reblinded", psi.exponentiate(peer.scalar, theirs))
    party.join()
    assert party.result.size == 0  # the same ten items on both sides, yet nothing matches


def test_peer_vanishes_mid_protocol():
    party, peer = attacked()
    peer.send("blinded", peer.blinded()[:5 * 32])
    peer.ch.close()
    refused(party, "the connection closed during the peer's blinded set")


def test_peer_stalls_and_the_party_times_out():
    party, peer = attacked(party_kw={"timeout": 0.5})
    peer.send("blinded", peer.blinded()[:5 * 32])
    refused(party, "the peer sent nothing for 0.5 s during the peer's blinded set")


def test_a_peer_asking_more_than_revealed_gets_nothing_back():
    party, peer = attacked(party_kw={"learn": "nothing", "reveal": "nothing"})
    peer.send("blinded", peer.blinded())
    kinds = [m.kind for m in peer.messages()]
    party.join()
    assert kinds == ["blinded"] and party.result.learned == "nothing"


def test_wrong_version_and_replayed_nonce():
    party = Party(ITEMS)
    party.mine.send(Message("hello", nonce=b"n" * 32, count=1, learn="size", reveal="size",
                            version="atoll-psi/0"))
    refused(party, "the peer speaks 'atoll-psi/0'")
    party = Party(ITEMS)
    hello = party.mine.recv(5)  # echo the party's own nonce back
    party.mine.send(Message("hello", nonce=hello.nonce, count=1, learn="size", reveal="size",
                            version=psi.VERSION))
    refused(party, "the peer's nonce is not 32 fresh bytes")
