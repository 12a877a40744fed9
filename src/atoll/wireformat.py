"""The fixed facts of the byte format: magic, version, header size, dtype codes.

``atoll.transport.wire`` is the only code that turns trees into bytes; the codecs that count
those bytes without serialising (``codecs.flat.wire_size``) or record a dtype in their payload
(``codecs.intrinsic``) read the same facts from here, below both.
"""
import torch

MAGIC = b"ATL"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 1 + 4  # magic, u8 version, u32 entry count
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.bool, torch.complex64, torch.complex128,
    torch.uint16, torch.uint32, torch.uint64,
]
CODE = {d: i for i, d in enumerate(DTYPES)}
