"""Field checks shared by the layouts: building errors are ValueErrors, refusals HV statuses."""

from __future__ import annotations

from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError

_U8 = (1 << 8) - 1
_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _check_uint(what: str, value: int, bits: int) -> None:
    """Programming errors while *building* a structure are ValueErrors, not HV statuses."""
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{what} = {value!r} does not fit in {bits} unsigned bits")


def _reserved(what: str, value: int, mask: int) -> None:
    bad = value & mask
    if bad:
        raise HvError(HvStatus.INVALID_PARAMETER, f"{what}: reserved bits 0x{bad:x} set (must be 0)")


def _padding(what: str, raw: bytes, strict: bool) -> None:
    if strict and any(raw):
        raise HvError(HvStatus.INVALID_PARAMETER, f"{what}: padding {raw.hex()} is not zero")


def _exact(what: str, buf: bytes, size: int) -> None:
    if len(buf) != size:
        raise HvError(HvStatus.INVALID_HYPERCALL_INPUT, f"{what}: {len(buf)} bytes, the structure has {size}")
