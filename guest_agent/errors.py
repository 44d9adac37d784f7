"""Errors of the guest agent, all in the one ``PviommuError`` tree.

Each carries the Hyper-V status a script should see, so ``pviommu.rpc.status``
maps them to gRPC codes with the status in the details; the agent never builds
gRPC errors itself.
"""

from __future__ import annotations

from pviommu.abi.hv_status import HvStatus
from pviommu.errors import PviommuError


class GuestAgentError(PviommuError):
    """Base of the agent's own refusals."""


class HypercallFailed(GuestAgentError):
    """The hypervisor answered a hypercall with a non-zero HV status."""

    def __init__(self, hv_status: HvStatus | int, message: str, *, call: str = "", reps_completed: int = 0) -> None:
        status = HvStatus(hv_status) if hv_status in HvStatus._value2member_map_ else HvStatus.OPERATION_FAILED
        super().__init__(message, hv_status=status)
        self.raw_status = int(hv_status)
        self.call = call
        self.reps_completed = reps_completed


class IommuAbsent(GuestAgentError):
    """No usable para-virtual IOMMU (PRESENT or S1 missing): the driver refuses
    to start rather than run devices with unprotected DMA."""

    hv_status = HvStatus.FEATURE_UNAVAILABLE


class InvalidRequest(GuestAgentError):
    """A request the agent refuses before any hypercall (bad size, MSI window, ...)."""

    hv_status = HvStatus.INVALID_PARAMETER


class NotFound(GuestAgentError):
    """An unknown domain, device or buffer."""

    hv_status = HvStatus.NOT_FOUND


class BusyError(GuestAgentError):
    """An object still in use (a domain with devices, a static domain)."""

    hv_status = HvStatus.INVALID_DEVICE_STATE


class IovaExhausted(GuestAgentError):
    """No IOVA range of the requested size is free below the limit."""

    hv_status = HvStatus.INSUFFICIENT_MEMORY


class DeviceTimeout(GuestAgentError):
    """A device did not write a completion record in time."""

    hv_status = HvStatus.TIME_OUT


class DeviceCommandFailed(GuestAgentError):
    """A DSA configuration command answered with a CMDSTS error."""

    hv_status = HvStatus.OPERATION_FAILED
