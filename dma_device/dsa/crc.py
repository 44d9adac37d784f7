"""The two CRCs of the DSA, on library code (no byte loops in Python).

* CRC-32C (Castagnoli, poly 0x1EDC6F41, reflected) for CRCGEN / COPY_CRC, with
  the descriptor's seed: register starts at ``~seed`` and the result is
  inverted, which is exactly ``crc32c.crc32c(data, seed)``; so seed 0 is the
  standard CRC-32C and a result seeds the rest of the data (partial
  completion; SPDK chains descriptors this way, each reading the previous
  record's crc_val with the read-CRC-seed flag).
* CRC-16 T10-DIF (poly 0x8BB7, init 0, not reflected) for DIF guard tags,
  from ``fastcrc``; the DIF flags can invert the seed (init 0xFFFF) and the
  result.

The op-specific CRC flags (bits 17/18) follow Intel DML's CRC kernel
(sources/core/src/crc.cpp), which accel-config's verification
(test/dsa.c dsa_calculate_crc32, run against hardware) agrees with: in
MSB-first terms the register starts at ``reverse32(~seed)`` and data bytes go
in bit-reversed, and the result is ``~reverse32(register)``; "bypass CRC
inversion and reflection" starts at ``seed`` and returns the register as is;
"bypass data reflection" feeds the bytes as they are.
"""

from __future__ import annotations

import crc32c
import fastcrc

from pviommu.abi.dsa import CRC_FLAG_BYPASS_CRC_INV_REF, CRC_FLAG_BYPASS_DATA_REF

_M32 = 0xFFFFFFFF
_REVERSE_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _reflect32(v: int) -> int:
    return int(f"{v & _M32:032b}"[::-1], 2)


def crc32c_dsa(data: bytes | memoryview, seed: int, flags: int = 0) -> int:
    """CRC-32C of ``data`` as the DSA computes it for ``seed`` and op flags.

    In the reflected register the library keeps, "bypass data reflection" is
    feeding each byte bit-reversed (a C-speed ``bytes.translate``) and "bypass
    CRC inversion and reflection" is starting from ``reverse32(seed)`` and
    returning ``reverse32(register)`` without the inversions; with either, a
    result still seeds the remainder of the data."""
    if flags & CRC_FLAG_BYPASS_DATA_REF:
        data = bytes(data).translate(_REVERSE_BITS)
    if flags & CRC_FLAG_BYPASS_CRC_INV_REF:
        reg_in = _reflect32(seed)
        reg_out = ~crc32c.crc32c(data, ~reg_in & _M32) & _M32
        return _reflect32(reg_out)
    return int(crc32c.crc32c(data, seed & _M32))


def crc16_t10dif(data: bytes | memoryview, invert_seed: bool = False, invert_result: bool = False) -> int:
    """T10-DIF guard of one block (DIF flags bit 2: seed 0xFFFF; bit 3: invert)."""
    crc = int(fastcrc.crc16.t10_dif(bytes(data), 0xFFFF if invert_seed else 0))
    return crc ^ 0xFFFF if invert_result else crc
