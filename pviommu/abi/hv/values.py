"""The TLFS hypercall input and result values."""

from __future__ import annotations

from dataclasses import dataclass

from pviommu.abi.hv._checks import _check_uint
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError

# --------------------------------------------------------------------------------------------
# Hypercall input and result values (TLFS)
# --------------------------------------------------------------------------------------------

_IN_CODE_MASK = 0xFFFF
_IN_FAST_BIT = 16
_IN_VARHEAD_SHIFT = 17
_IN_VARHEAD_MASK = 0x3FF << _IN_VARHEAD_SHIFT  # bits 17-26
_IN_NESTED_BIT = 31
_IN_REP_COUNT_SHIFT = 32
_IN_REP_START_SHIFT = 48
_REP_MASK = 0xFFF
HV_MAX_REP_COUNT = _REP_MASK
#: Bits of the input value that no field defines: 27-30, 44-47, 60-63.
HV_HYPERCALL_INPUT_RESERVED_MASK = (0xF << 27) | (0xF << 44) | (0xF << 60)


def check_reps(call: str, rep_count: int, rep_start: int = 0) -> None:
    """A rep call's rep count and start index (TLFS): ``1 <= rep_count <= 4095`` and ``rep_start <
    rep_count``, else INVALID_HYPERCALL_INPUT. The one check of the raw decoder, the typed gRPC
    methods and the rep requests' constructors."""
    if not 1 <= rep_count <= HV_MAX_REP_COUNT:
        raise HvError(HvStatus.INVALID_HYPERCALL_INPUT,
                      f"{call} is a rep call: rep count {rep_count} outside 1..{HV_MAX_REP_COUNT}")
    if not 0 <= rep_start < rep_count:
        raise HvError(HvStatus.INVALID_HYPERCALL_INPUT,
                      f"{call}: rep start {rep_start} is not smaller than rep count {rep_count}")


@dataclass(frozen=True)
class HypercallInput:
    """The 64-bit hypercall input value (TLFS ``HV_X64_HYPERCALL_INPUT``).

    ``call_code`` is a plain int so unknown codes survive decoding (:func:`decode_call` answers
    them). ``variable_header_size`` is in 8-byte units. ``reserved`` holds the value's bits that
    no field defines, in place (a mask over bits 27-30, 44-47, 60-63): decoding never refuses,
    the caller refuses a non-zero ``reserved`` with INVALID_HYPERCALL_INPUT.
    """

    call_code: int
    rep_count: int = 0
    rep_start: int = 0
    fast: bool = False
    variable_header_size: int = 0
    nested: bool = False
    reserved: int = 0

    def __post_init__(self) -> None:
        _check_uint("call_code", self.call_code, 16)
        _check_uint("rep_count", self.rep_count, 12)
        _check_uint("rep_start", self.rep_start, 12)
        _check_uint("variable_header_size", self.variable_header_size, 10)
        if self.reserved & ~HV_HYPERCALL_INPUT_RESERVED_MASK:
            raise ValueError(f"reserved = 0x{self.reserved:x} has bits outside the reserved mask")

    def encode(self) -> int:
        return (
            self.call_code
            | int(self.fast) << _IN_FAST_BIT
            | self.variable_header_size << _IN_VARHEAD_SHIFT
            | int(self.nested) << _IN_NESTED_BIT
            | self.rep_count << _IN_REP_COUNT_SHIFT
            | self.rep_start << _IN_REP_START_SHIFT
            | self.reserved
        )

    @classmethod
    def decode(cls, value: int) -> HypercallInput:
        _check_uint("hypercall input value", value, 64)
        return cls(
            call_code=value & _IN_CODE_MASK,
            fast=bool((value >> _IN_FAST_BIT) & 1),
            variable_header_size=(value & _IN_VARHEAD_MASK) >> _IN_VARHEAD_SHIFT,
            nested=bool((value >> _IN_NESTED_BIT) & 1),
            rep_count=(value >> _IN_REP_COUNT_SHIFT) & _REP_MASK,
            rep_start=(value >> _IN_REP_START_SHIFT) & _REP_MASK,
            reserved=value & HV_HYPERCALL_INPUT_RESERVED_MASK,
        )


@dataclass(frozen=True)
class HypercallResult:
    """The 64-bit hypercall result value (TLFS ``HV_X64_HYPERCALL_OUTPUT``): status in bits 0-15,
    reps completed in bits 32-43. The other bits are reserved; the TLFS tells callers to ignore
    them, so :meth:`decode` does. ``status`` is an int so an unknown status survives decoding.
    For rep calls ``reps_completed`` counts from element 0, not from the rep start index."""

    status: int
    reps_completed: int = 0

    def __post_init__(self) -> None:
        _check_uint("status", self.status, 16)
        _check_uint("reps_completed", self.reps_completed, 12)

    @property
    def ok(self) -> bool:
        return self.status == HvStatus.SUCCESS

    def encode(self) -> int:
        return self.status | self.reps_completed << 32

    @classmethod
    def decode(cls, value: int) -> HypercallResult:
        _check_uint("hypercall result value", value, 64)
        return cls(status=value & 0xFFFF, reps_completed=(value >> 32) & _REP_MASK)
