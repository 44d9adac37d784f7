"""Hypothesis strategies of ``pviommu.abi.hv`` requests, shared by the raw-ABI round trips
(tests/abi/test_hv_registry.py and its siblings) and the typed-message round trips (tests/abi/test_hvproto.py).

``typed=True`` draws only what a typed gRPC message can carry: rep start 0 and the default
``target_vtl`` of MapDeviceGpaPages (the typed messages have neither field).
"""

from __future__ import annotations

from hypothesis import strategies as st

from pviommu.abi.hv import (
    AttachDeviceDomainInput,
    ConfigureDeviceDomainInput,
    CreateDeviceDomainInput,
    DeleteDeviceDomainInput,
    DetachDeviceDomainInput,
    DeviceDomain,
    DeviceDomainId,
    DeviceDomainSettings,
    FlushDeviceDomainInput,
    FlushDeviceDomainListHeader,
    FlushDeviceDomainListRequest,
    FlushVa,
    GetIommuCapabilitiesInput,
    GetLogicalDevicePropertyInput,
    HvDeviceId,
    HvInputVtl,
    HvRequest,
    MapDeviceGpaPagesHeader,
    MapDeviceGpaPagesRequest,
    MapFlags,
    UnmapDeviceGpaPagesInput,
    UnmapDeviceGpaPagesRequest,
)
from pviommu.addr import Gpa, Iova

u64 = st.integers(0, (1 << 64) - 1)
vtls = st.builds(HvInputVtl, st.integers(0, 15), st.booleans())
domain_ids = st.builds(DeviceDomainId, st.integers(0, 15), st.integers(0, 0xFFFFFFFF))
device_domains = st.builds(DeviceDomain, u64, domain_ids, vtls)
device_ids = st.builds(HvDeviceId.from_u64, u64)
settings = st.builds(DeviceDomainSettings, st.booleans(), st.booleans(), st.integers(0, 1), u64.map(Gpa))
flush_vas = st.builds(FlushVa, st.integers(0, (1 << 52) - 1), st.integers(0, 0xFFF))


def _start(draw: st.DrawFn, count: int, typed: bool) -> int:
    return 0 if typed else draw(st.integers(0, count - 1))


@st.composite
def flush_list_requests(draw: st.DrawFn, typed: bool = False) -> FlushDeviceDomainListRequest:
    vas = tuple(draw(st.lists(flush_vas, min_size=1, max_size=(4096 - 32) // 8)))
    header = FlushDeviceDomainListHeader(draw(device_domains), draw(st.booleans()))
    return FlushDeviceDomainListRequest(header, vas, _start(draw, len(vas), typed))


@st.composite
def map_requests(draw: st.DrawFn, typed: bool = False) -> MapDeviceGpaPagesRequest:
    pages = tuple(draw(st.lists(u64, min_size=1, max_size=(4096 - 40) // 8)))
    header = MapDeviceGpaPagesHeader(
        draw(device_domains), MapFlags(draw(st.integers(0, 3))), Iova(draw(u64)),
        HvInputVtl() if typed else draw(vtls),
    )
    return MapDeviceGpaPagesRequest(header, pages, _start(draw, len(pages), typed))


@st.composite
def unmap_requests(draw: st.DrawFn, typed: bool = False) -> UnmapDeviceGpaPagesRequest:
    count = draw(st.integers(1, 0xFFF))
    inp = UnmapDeviceGpaPagesInput(draw(device_domains), Iova(draw(u64)))
    return UnmapDeviceGpaPagesRequest(inp, count, _start(draw, count, typed))


def hv_requests(typed: bool = False) -> st.SearchStrategy[HvRequest]:
    """Every call's request, any field value its layout holds."""
    return st.one_of(
        st.builds(CreateDeviceDomainInput, device_domains, st.booleans(), st.booleans()),
        st.builds(DeleteDeviceDomainInput, device_domains),
        st.builds(AttachDeviceDomainInput, device_domains, device_ids),
        st.builds(DetachDeviceDomainInput, u64, device_ids),
        st.builds(ConfigureDeviceDomainInput, device_domains, settings),
        st.builds(FlushDeviceDomainInput, device_domains),
        st.builds(GetIommuCapabilitiesInput, u64),
        st.builds(GetLogicalDevicePropertyInput, u64, u64, st.integers(0, 0xFFFFFFFF)),
        flush_list_requests(typed),
        map_requests(typed),
        unmap_requests(typed),
    )
