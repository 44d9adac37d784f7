"""Hyper-V guest-IOMMU hypercall ABI: call codes, the input/result values and packed layouts.

C sources (shared/reference/hyperv-guest-iommu.md): the call codes and layouts of the Linux RFC
"Hyper-V pvIOMMU" 3/5 (``hvgdk_mini.h``, ``hvhdk_mini.h``) and PATCH v1/v2 4/4 (FLUSH_DEVICE_DOMAIN_LIST);
the root-side MAP/UNMAP_DEVICE_GPA_PAGES of Wei Liu's RFC of 9 Jul 2021; ``hv_build_logical_dev_id()``
of RFC 1/5; the TLFS input/result values and common statuses. Which refusal gets which status, and why:
docs/hypercall-statuses.md.

Every structure is ``__packed`` little-endian, a frozen dataclass with ``SIZE``, ``pack()`` and
``unpack(buf)``; reserved fields are not dataclass fields (packed as 0, checked on unpack), so a decoded
object cannot carry a set reserved bit. Decoding happens here, before any handler runs. One module per
section: ``codes``, ``ids``, ``values``, ``inputs``, ``outputs``, ``reps``, ``registry``; this package
is their public face (``from pviommu.abi import hv; hv.CreateDeviceDomainInput``).
"""

from __future__ import annotations

from pviommu.abi.hv.codes import (
    FIRST_STAGE_PAGING_4LEVEL,
    FIRST_STAGE_PAGING_5LEVEL,
    HV_DEVICE_DOMAIN_ID_DEFAULT,
    HV_DEVICE_DOMAIN_ID_NULL,
    HV_DEVICE_IOMMU_ENABLED,
    HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT,
    HV_HYP_PAGE_SIZE,
    HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU,
    HV_PARTITION_ID_SELF,
    REP_CALLS,
    DeviceDomainType,
    HvCallCode,
    HvDeviceType,
    IommuCap,
    MapFlags,
)
from pviommu.abi.hv.ids import (
    HvDeviceId,
    PciDeviceId,
    build_logical_device_id,
    logical_device_id_prefix,
)
from pviommu.abi.hv.inputs import (
    AttachDeviceDomainInput,
    ConfigureDeviceDomainInput,
    CreateDeviceDomainInput,
    DeleteDeviceDomainInput,
    DetachDeviceDomainInput,
    DeviceDomain,
    DeviceDomainId,
    DeviceDomainSettings,
    FlushDeviceDomainInput,
    GetIommuCapabilitiesInput,
    GetLogicalDevicePropertyInput,
    HvInputVtl,
)
from pviommu.abi.hv.outputs import (
    GetIommuCapabilitiesOutput,
    GetLogicalDevicePropertyOutput,
)
from pviommu.abi.hv.registry import (
    CALLS,
    CallSpec,
    HvOutput,
    HvRepRequest,
    HvRequest,
    HvSimpleInput,
    call_spec,
    decode_call,
    decode_input,
    decode_output,
    encode_output,
    encode_request,
)
from pviommu.abi.hv.reps import (
    FlushDeviceDomainListHeader,
    FlushDeviceDomainListRequest,
    FlushVa,
    MapDeviceGpaPagesHeader,
    MapDeviceGpaPagesRequest,
    UnmapDeviceGpaPagesInput,
    UnmapDeviceGpaPagesRequest,
)
from pviommu.abi.hv.values import (
    HV_HYPERCALL_INPUT_RESERVED_MASK,
    HV_MAX_REP_COUNT,
    HypercallInput,
    HypercallResult,
    check_reps,
)

__all__ = [
    "CALLS",
    "FIRST_STAGE_PAGING_4LEVEL",
    "FIRST_STAGE_PAGING_5LEVEL",
    "HV_DEVICE_DOMAIN_ID_DEFAULT",
    "HV_DEVICE_DOMAIN_ID_NULL",
    "HV_DEVICE_IOMMU_ENABLED",
    "HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT",
    "HV_HYPERCALL_INPUT_RESERVED_MASK",
    "HV_HYP_PAGE_SIZE",
    "HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU",
    "HV_MAX_REP_COUNT",
    "HV_PARTITION_ID_SELF",
    "REP_CALLS",
    "AttachDeviceDomainInput",
    "CallSpec",
    "ConfigureDeviceDomainInput",
    "CreateDeviceDomainInput",
    "DeleteDeviceDomainInput",
    "DetachDeviceDomainInput",
    "DeviceDomain",
    "DeviceDomainId",
    "DeviceDomainSettings",
    "DeviceDomainType",
    "FlushDeviceDomainInput",
    "FlushDeviceDomainListHeader",
    "FlushDeviceDomainListRequest",
    "FlushVa",
    "GetIommuCapabilitiesInput",
    "GetIommuCapabilitiesOutput",
    "GetLogicalDevicePropertyInput",
    "GetLogicalDevicePropertyOutput",
    "HvCallCode",
    "HvDeviceId",
    "HvDeviceType",
    "HvInputVtl",
    "HvOutput",
    "HvRepRequest",
    "HvRequest",
    "HvSimpleInput",
    "HypercallInput",
    "HypercallResult",
    "IommuCap",
    "MapDeviceGpaPagesHeader",
    "MapDeviceGpaPagesRequest",
    "MapFlags",
    "PciDeviceId",
    "UnmapDeviceGpaPagesInput",
    "UnmapDeviceGpaPagesRequest",
    "build_logical_device_id",
    "call_spec",
    "check_reps",
    "decode_call",
    "decode_input",
    "decode_output",
    "encode_output",
    "encode_request",
    "logical_device_id_prefix",
]
