"""Byte sizes as people type and read them (``256M``, ``1G``, ``0x4000``).

One parser for every command line and service option that takes a size, so
``--memory 2T`` means the same thing (and fails the same clear way)
everywhere.
"""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE = re.compile(r"^\s*(0x[0-9a-f]+|\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"256M"`` -> 268435456. Units K, M, G, T are powers of 1024 (``MiB``,
    ``MB`` and ``M`` mean the same); hex (``0x4000``) is taken as bytes.
    Raises ValueError with the accepted forms for anything else."""
    m = _SIZE.match(str(text))
    if m is None:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 0x4000, 64K, 256M, 1G, 2T)")
    number, unit = m.group(1), m.group(2).upper()
    if number.lower().startswith("0x"):
        if unit:
            raise ValueError(f"{text!r}: a hex size takes no unit")
        return int(number, 16)
    value = float(number) * _UNITS[unit]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """``268435456`` -> ``"256 MiB"``; exact multiples only, else one decimal."""
    for name, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= unit:
            return f"{n // unit} {name}" if n % unit == 0 else f"{n / unit:.1f} {name}"
    return f"{n} B"
