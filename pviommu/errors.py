"""The one error tree of pviommu.

Core code raises these; it never builds gRPC statuses. Each error carries
the Hyper-V status (``hv_status``) a hypercall answers with, and DSA errors
the completion status (``dsa_status``). ``pviommu.rpc.status`` is the only
place that turns them into gRPC codes.
"""

from __future__ import annotations

from pviommu.abi.hv_status import HvStatus


class PviommuError(Exception):
    """Base of every error pviommu raises on purpose."""

    hv_status: HvStatus = HvStatus.OPERATION_FAILED

    def __init__(self, message: str, *, hv_status: HvStatus | None = None) -> None:
        super().__init__(message)
        if hv_status is not None:
            self.hv_status = hv_status


# --- memory -----------------------------------------------------------------
class MemoryError_(PviommuError):
    """An address that names no backing memory (named with a trailing
    underscore so it never shadows the builtin ``MemoryError``)."""

    hv_status = HvStatus.INVALID_PARAMETER

    def __init__(self, message: str, *, addr: int, length: int = 0) -> None:
        super().__init__(message)
        self.addr = addr
        self.length = length


class HpaOutOfRange(MemoryError_):
    """An HPA range that is not wholly inside one existing bank."""


class GpaOutOfRange(MemoryError_):
    """A GPA range outside the partition's RAM."""


class OutOfFrames(PviommuError):
    """A frame allocator has no free block of the requested order."""

    hv_status = HvStatus.INSUFFICIENT_MEMORY


# --- hypercalls and hypervisor state ----------------------------------------
class HvError(PviommuError):
    """A hypercall refused with a specific HV status (always given)."""

    def __init__(self, hv_status: HvStatus, message: str, *, reps_completed: int = 0) -> None:
        super().__init__(message, hv_status=hv_status)
        #: For rep hypercalls: elements done before the refused one.
        self.reps_completed = reps_completed


class AuthError(PviommuError):
    """Missing or unknown credential: the call is not attributable."""

    hv_status = HvStatus.ACCESS_DENIED


# --- translation --------------------------------------------------------------
class PageTableError(PviommuError):
    """A page-table builder request that cannot be carried out (overlap,
    misalignment, address outside the format's width, ...)."""

    hv_status = HvStatus.INVALID_PARAMETER


# --- devices ------------------------------------------------------------------
class DsaError(PviommuError):
    """A descriptor the DSA refuses; ``dsa_status`` goes in its completion record."""

    def __init__(self, dsa_status: int, message: str) -> None:
        super().__init__(message)
        self.dsa_status = dsa_status


class ServiceUnavailable(PviommuError):
    """Another service this one depends on (the hypervisor, a device) did not
    answer: the caller gets gRPC UNAVAILABLE naming it, not an opaque error."""

    hv_status = HvStatus.TIME_OUT


class DeviceUnavailable(PviommuError):
    """A device (or its IOMMU unit) did not answer in time."""

    hv_status = HvStatus.TIME_OUT


class UnitStalled(DeviceUnavailable):
    """An IOMMU unit that is alive (its queue is served) did not confirm in
    time: it may still hold what it was asked to drop, so it is not in sync."""


class UnitGone(PviommuError):
    """No process serves the unit any more (its doorbell is refused): it
    holds no translations and never will again."""

    hv_status = HvStatus.INVALID_DEVICE_STATE
