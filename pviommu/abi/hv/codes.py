"""Call codes, the constants and flag sets of the guest-IOMMU interface."""

from __future__ import annotations

from enum import IntEnum, IntFlag

# --------------------------------------------------------------------------------------------
# Call codes
# --------------------------------------------------------------------------------------------


class HvCallCode(IntEnum):
    """``HVCALL_*`` codes of the guest-IOMMU interface (plus the root-side map/unmap)."""

    CREATE_DEVICE_DOMAIN = 0x00B1
    ATTACH_DEVICE_DOMAIN = 0x00B2
    MAP_DEVICE_GPA_PAGES = 0x00B3
    UNMAP_DEVICE_GPA_PAGES = 0x00B4
    DETACH_DEVICE_DOMAIN = 0x00C4
    DELETE_DEVICE_DOMAIN = 0x00C5
    CONFIGURE_DEVICE_DOMAIN = 0x00CE
    FLUSH_DEVICE_DOMAIN = 0x00D0
    FLUSH_DEVICE_DOMAIN_LIST = 0x00D1
    GET_IOMMU_CAPABILITIES = 0x0125
    GET_LOGICAL_DEVICE_PROPERTY = 0x0127


#: Rep hypercalls. FLUSH_DEVICE_DOMAIN_LIST repeats over ``hv_iommu_flush_va`` elements,
#: MAP_DEVICE_GPA_PAGES over its ``gpa_page_list``, UNMAP_DEVICE_GPA_PAGES over pages (no
#: elements in the input; the rep count is the page count).
REP_CALLS: frozenset[HvCallCode] = frozenset(
    {
        HvCallCode.FLUSH_DEVICE_DOMAIN_LIST,
        HvCallCode.MAP_DEVICE_GPA_PAGES,
        HvCallCode.UNMAP_DEVICE_GPA_PAGES,
    }
)

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

HV_PARTITION_ID_SELF = 0xFFFF_FFFF_FFFF_FFFF
#: The TLFS input page: an input parameter list may not span pages.
HV_HYP_PAGE_SIZE = 4096


class DeviceDomainType(IntEnum):
    """``HV_DEVICE_DOMAIN_TYPE_*``: guests use S1; S2 and SOC are root-side."""

    S2 = 0
    S1 = 1
    SOC = 2


HV_DEVICE_DOMAIN_ID_DEFAULT = 0
HV_DEVICE_DOMAIN_ID_NULL = 0xFFFF_FFFF


class IommuCap(IntFlag):
    """``HV_IOMMU_CAP_*`` bits of ``hv_output_get_iommu_capabilities.iommu_cap``."""

    PRESENT = 1 << 0
    S2 = 1 << 1
    S1 = 1 << 2
    S1_5LVL = 1 << 3
    PASID = 1 << 4
    ATS = 1 << 5
    PRI = 1 << 6


HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU = 10
#: Bit 0 of ``hv_output_get_logical_device_property.device_iommu``.
HV_DEVICE_IOMMU_ENABLED = 1 << 0


class MapFlags(IntFlag):
    """``HV_MAP_GPA_*`` bits of ``map_device_gpa_pages.map_flags``."""

    READABLE = 0x1
    WRITABLE = 0x2


#: Bit 0 of ``hv_input_flush_device_domain_list.flags``.
HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT = 1 << 0

#: ``hv_device_domain_settings.first_stage_paging_mode`` values.
FIRST_STAGE_PAGING_4LEVEL = 0
FIRST_STAGE_PAGING_5LEVEL = 1


class HvDeviceType(IntEnum):
    """``HV_DEVICE_TYPE_*``: bits 62-63 of every ``hv_device_id``."""

    LOGICAL = 0
    PCI = 1
    IOAPIC = 2
    ACPI = 3
