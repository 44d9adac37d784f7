"""Hyper-V status codes (HV_STATUS_*), as in Linux hvgdk_mini.h / the TLFS.

Source: shared/reference/hyperv-guest-iommu.md section 4.
"""

from __future__ import annotations

from enum import IntEnum


class HvStatus(IntEnum):
    SUCCESS = 0x0
    INVALID_HYPERCALL_CODE = 0x2
    INVALID_HYPERCALL_INPUT = 0x3
    INVALID_ALIGNMENT = 0x4
    INVALID_PARAMETER = 0x5
    ACCESS_DENIED = 0x6
    INVALID_PARTITION_STATE = 0x7
    OPERATION_DENIED = 0x8
    UNKNOWN_PROPERTY = 0x9
    PROPERTY_VALUE_OUT_OF_RANGE = 0xA
    INSUFFICIENT_MEMORY = 0xB
    INVALID_PARTITION_ID = 0xD
    INVALID_VP_INDEX = 0xE
    NOT_FOUND = 0x10
    INVALID_PORT_ID = 0x11
    INVALID_CONNECTION_ID = 0x12
    INSUFFICIENT_BUFFERS = 0x13
    NO_RESOURCES = 0x1D
    FEATURE_UNAVAILABLE = 0x1E
    INSUFFICIENT_DEVICE_DOMAINS = 0x38
    INVALID_LP_INDEX = 0x41
    INVALID_REGISTER_VALUE = 0x50
    INVALID_DEVICE_ID = 0x57
    INVALID_DEVICE_STATE = 0x58
    PENDING_PAGE_REQUESTS = 0x59
    PAGE_REQUEST_INVALID = 0x60
    DEVICE_ALREADY_IN_DOMAIN = 0x66
    OPERATION_FAILED = 0x71
    INSUFFICIENT_CONTIGUOUS_MEMORY = 0x75
    TIME_OUT = 0x78
    CALL_PENDING = 0x79
    VTL_ALREADY_ENABLED = 0x86

    @classmethod
    def name_of(cls, value: int) -> str:
        """``HV_STATUS_<NAME>`` for a known code, hex for an unknown one."""
        try:
            return "HV_STATUS_" + cls(value).name
        except ValueError:
            return f"HV_STATUS_0x{value:x}"
