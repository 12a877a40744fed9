"""vertical.wire: tensors and bytes round-trip exactly; a payload that is not what it says is
refused naming the party and the field, before a tensor is made."""
import re

import pytest
import torch

from atoll.vertical import wire
from atoll.vertical.channel import PartyError


@pytest.mark.parametrize("msg", [torch.randn(5, 3, dtype=torch.float64), torch.randn(4).float(),
                                 torch.arange(7), torch.zeros(0, 2, dtype=torch.float64), b"\x00\xff", None])
def test_round_trip_is_exact(msg):
    got = wire.decode(*wire.encode(msg), "p", "f")
    if isinstance(msg, torch.Tensor):
        assert got.dtype == msg.dtype and torch.equal(got, msg)
    else:
        assert got == msg


@pytest.mark.parametrize("dtype, shape, data, words", [
    ("object", "2", b"\x00" * 16, "has dtype 'object'"),
    ("float64", "2", b"\x00" * 15, "has 15 bytes, its shape (2,) needs 16"),
    ("float64", "1,1,1,1,1", b"\x00" * 8, "malformed shape"),
    ("float64", "-2", b"", "malformed shape"),
    ("int64", "99999999999", b"\x00" * 8, "malformed shape"),  # 11 digits: refused before any product
    ("int64", "4294967296,4294967296", b"\x00" * 8, "needs"),  # a huge shape: refused, nothing allocated
    ("none", "", b"\x01", "a none payload with a shape or data"),
])
def test_malformed_payloads_are_refused_naming_party_and_field(dtype, shape, data, words):
    with pytest.raises(PartyError, match=rf"party 'telecom': field 'embedding'.*{re.escape(words)}"):
        wire.decode(dtype, shape, data, "telecom", "embedding")


def test_only_known_dtypes_are_sent():
    with pytest.raises(TypeError, match="complex128"):
        wire.encode(torch.zeros(2, dtype=torch.complex128))
