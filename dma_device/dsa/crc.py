"""The two CRCs of the DSA, on library code (no byte loops in Python).

* CRC-32C (Castagnoli, poly 0x1EDC6F41, reflected) for CRCGEN / COPY_CRC, with
  the descriptor's seed: register starts at ``~seed`` and the result is
  inverted, which is exactly ``crc32c.crc32c(data, seed)``; so seed 0 is the
  standard CRC-32C and a partial result can seed the rest (partial completion).
* CRC-16 T10-DIF (poly 0x8BB7, init 0, not reflected) for DIF guard tags,
  from ``fastcrc``; the DIF flags can invert the seed (init 0xFFFF) and the
  result.
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

    Bypass flags (bits 17/18, accel-config dsa.h, DML): "bypass data
    reflection" feeds each byte bit-reversed (a C-speed ``bytes.translate``);
    "bypass CRC inversion and reflection" starts from the seed as is and returns
    the register uninverted and unreflected (inf: no spec text at hand; chosen
    so a partial result still seeds the remainder)."""
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
