"""The stage messages as bytes: each reads back what was written, and a reader refuses a wrong
size, an unexpected or repeated id and a wrong kind, naming it, before it uses the contents."""
import os

import pytest

from atoll.secure import primitives as pr
from atoll.secure import stagewire as W
from atoll.secure.secagg import Setup


def test_every_message_reads_back_what_was_written():
    st = Setup.new([3, 5, 8, 13], 7, 100, 12, neighbours=2)
    back = W.read_setup(W.setup_bytes(st), 4)
    assert back == st
    keys = {5: (pr.keypair()[1], pr.keypair()[1]), 13: (pr.keypair()[1], pr.keypair()[1])}
    raw = W.records({v: W.keys_bytes(k) for v, k in keys.items()})
    assert W.read_key_map(raw, {5, 13}) == keys and len(raw) == 2 * (4 + W.KEYS)
    assert W.read_request(W.request_bytes({3, 5}, {13}), {3, 5, 13}) == ({3, 5}, {13})
    shares = {5: ("b", bytes(W.SHARE)), 13: ("s", bytes(range(W.SHARE)))}
    assert W.read_shares(W.shares_bytes(shares), {5: "b", 13: "s"}) == shares
    assert W.masked_size(st) == -(-100 * st.bits // 8)


@pytest.mark.parametrize("read,words", [
    (lambda: W.read_setup(b"\0" * 43, 4), "shorter than its 44-byte header"),
    (lambda: W.read_setup(W.setup_bytes(Setup.new(range(6), 1, 5, 8)), 4), "6 clients, not in [2, 4]"),
    (lambda: W.read_setup(W.setup_bytes(Setup.new(range(3), 1, 5, 8)) + b"\0", 4), "56 expected"),
    (lambda: W.read_records(b"\0" * 8, 3, {0, 1}, "x"), "not a whole number of 7-byte records"),
    (lambda: W.read_records(b"\0" * 21, 3, {0, 1}, "x"), "at most 2"),
    (lambda: W.read_records(W.records({1: b"abc"}) * 2, 3, {0, 1}, "x"), "id 1 appears twice"),
    (lambda: W.read_records(W.records({4: b"abc"}), 3, {0, 1}, "x"), "id 4 is not one"),
    (lambda: W.read_keys(os.urandom(63)), "63 bytes, 64 expected"),
    (lambda: W.read_keys(bytes(32) + pr.keypair()[1]), "low-order point"),
    (lambda: W.read_request(W.records({1: b"x"}), {1}), "neither 'b' nor 's'"),
    (lambda: W.read_shares(W.shares_bytes({1: ("s", bytes(W.SHARE))}), {1: "b"}), "not of the kind"),
    (lambda: W.read_shares(W.shares_bytes({1: ("b", b"\xff" * W.SHARE)}), {1: "b"}), "outside the field"),
])
def test_a_reader_refuses_what_does_not_fit_and_says_what(read, words):
    with pytest.raises(ValueError) as exc:
        read()
    assert words in str(exc.value)


def test_the_malicious_mode_messages_read_back_and_refuse_what_does_not_fit():
    from atoll.secure import active as A
    adv = (pr.keypair()[1], pr.keypair()[1], os.urandom(A.SIG), os.urandom(300))
    raw = W.advert_bytes(adv)
    assert len(raw) == W.ADVERT == 64 + 64 + 2 + 1024 and W.read_advert(raw) == adv
    assert W.read_advert_map(W.records({7: raw}), {7}) == {7: adv}
    sigs = {1: os.urandom(64), 4: os.urandom(64)}
    assert W.read_unmask(W.unmask_bytes({1, 2}, {4}, sigs), {1, 2, 4}, {1, 4}) == ({1, 2}, {4}, sigs)
    assert set(W.read_records(W.records({v: b"" for v in (2, 9)}), 0, range(10), "survivor set")) == {2, 9}
    for bad, words in [(raw[:-1], "1153 bytes, 1154 expected"),
                       (raw[:128] + b"\0\0" + raw[130:], "a credential of 0 bytes"),
                       (raw[:-1] + b"\1", "zero-padded"),
                       (raw[:128] + (1025).to_bytes(2, "little") + raw[130:], "a credential of 1025 bytes")]:
        with pytest.raises(ValueError, match=words):
            W.read_advert(bad)
    with pytest.raises(ValueError, match="a length 99 outside the 13-byte message"):
        W.read_unmask((99).to_bytes(4, "little") + bytes(9), {1}, {1})
    with pytest.raises(ValueError, match="signatures: id 3 is not one"):
        W.read_unmask(W.unmask_bytes({1}, set(), {3: bytes(64)}), {1}, {1})
    with pytest.raises(ValueError, match="signature: 63 bytes"):
        W.read_signature(bytes(63))
