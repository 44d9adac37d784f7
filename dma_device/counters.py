"""The device's and its IOMMU unit's counters, named once: the Prometheus
collector exports them as ``pviommu_dsa_<name>`` and ``DsaDevice.GetCounters``
answers the same names, flattened (``descriptors.MEMMOVE``, ``iommu_faults.0x6``)."""

from __future__ import annotations

from dma_device.dsa.device import DsaDevice
from pviommu.iommu.unit import IommuUnit

#: a flat count, or counts by one label (opcode, status, outcome, fault reason)
Counters = dict[str, int | dict[str, int]]
#: names exported as gauges (a level, not a running count)
GAUGES = frozenset({"iotlb_entries"})
#: the label of each labelled counter
LABELS = {"descriptors": ("opcode",), "completions": ("status",), "page_request_outcomes": ("outcome",),
          "iommu_faults": ("reason",)}


def device_counters(device: DsaDevice, unit: IommuUnit | None) -> Counters:
    """Every counter of ``device`` and (once it exists) its IOMMU unit."""
    out: Counters = dict(device.counters.snapshot())
    if unit is None:
        return out
    st = unit.iotlb.stats
    out.update({"iotlb_hits": st.hits, "iotlb_misses": st.misses, "iotlb_inserts": st.inserts,
                "iotlb_evictions": st.evictions, "iotlb_invalidations_global": st.inv_global,
                "iotlb_invalidations_domain": st.inv_domain, "iotlb_invalidations_pages": st.inv_pages,
                "iotlb_entries_dropped": st.entries_dropped, "iotlb_entries": len(unit.iotlb),
                "iommu_walks": unit.stats.walks, "iommu_walk_reads": unit.stats.walk_reads,
                "iommu_translations": unit.stats.translations,
                "iommu_faults": {f"{int(k):#x}": v for k, v in unit.stats.faults.items()}})
    ps = unit.pscache
    if ps is not None:  # paging-structure caches (pviommu.iommu.pscache)
        p = ps.stats
        out.update({"pscache_fs_hits": sum(p.fs_hits), "pscache_fs_misses": p.fs_misses,
                    "pscache_table_hits": p.table_hits, "pscache_table_misses": p.table_misses,
                    "pscache_inserts": p.inserts, "pscache_late_inserts_dropped": p.late_inserts_dropped,
                    "pscache_evictions": p.evictions, "pscache_rewalks": p.rewalks,
                    "pscache_entries_dropped": p.entries_dropped, "pscache_entries": len(ps)})
    return out


def flat(counters: Counters) -> dict[str, int]:
    """``{"descriptors": {"MEMMOVE": 3}}`` -> ``{"descriptors.MEMMOVE": 3}`` (GetCounters' map)."""
    out: dict[str, int] = {}
    for key, value in counters.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": int(v) for k, v in value.items()})
        else:
            out[key] = int(value)
    return out
