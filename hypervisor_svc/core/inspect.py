"""What ``Admin.DumpStage2`` / ``DumpStage1`` / ``ExplainIova`` compute.

The hypervisor is the one place that can read bank 0 and every partition's
RAM, so inspection runs here, with the shared code only: tables are read by
``pviommu.pt.walk.TableIterator`` (the generic reader, any format) and walks
are explained by an ``IommuUnit`` over the host's memory -- the same context
checks and nested walk a device's unit runs, in dry-run mode (no IOTLB fill,
no A/D update). Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor_svc.core.host import Host
from hypervisor_svc.core.model import Domain, Partition
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa, Hpa, Iova
from pviommu.errors import HvError, PviommuError
from pviommu.iommu.unit import Explanation, IommuUnit
from pviommu.mem.bank import GuestRam
from pviommu.pt.common import Perm, PtFormat
from pviommu.pt.fmt.x86_64 import X86_64Format
from pviommu.pt.walk import MappedRange, TableItem, TableIterator, mapped_ranges

#: table pages one dump reads at most (a hostile guest table cannot make it huge)
MAX_DUMP_TABLES = 4096


def perm_text(perm: Perm) -> str:
    """``rwx`` with ``-`` for what is missing, then ``s`` for a supervisor-only
    entry (x86 U/S=0: a device request through it faults) or ``u``."""
    p = int(perm)
    return "".join(c if p & int(bit) else "-" for c, bit in (("r", Perm.READ), ("w", Perm.WRITE), ("x", Perm.EXEC))) \
        + ("s" if p & int(Perm.PRIV) else "u")


@dataclass(frozen=True, slots=True)
class Dump:
    format: str
    input_space: str
    output_space: str
    table_space: str
    root: int
    items: list[TableItem]
    ranges: list[MappedRange]
    truncated: bool
    tables_read: int


def _dump(fmt: PtFormat, it: TableIterator, spaces: tuple[str, str, str]) -> Dump:
    items = list(it)
    return Dump(fmt.name, *spaces, it.root, items, mapped_ranges(items), it.truncated, it.tables_read)


def dump_stage2(host: Host, partition_id: int) -> Dump:
    """The partition's GPA -> HPA table in bank 0."""
    with host.lock:
        part = host.partition(partition_id)
        fmt = host.tables.fmt
        it = TableIterator(fmt, lambda a: host.memory.read_u64(Hpa(a)), int(part.stage2.root),
                           max_tables=MAX_DUMP_TABLES)
        return _dump(fmt, it, ("GPA", "HPA", "HPA"))


def _domain(part: Partition, domain_id: int) -> Domain:
    dom = part.domains.get(domain_id)
    if dom is None:
        raise HvError(HvStatus.INVALID_PARAMETER, f"no device domain {domain_id} in partition {part.partition_id}")
    return dom


def dump_stage1(host: Host, partition_id: int, domain_id: int) -> Dump:
    """The domain's stage-1 table as the guest wrote it in its RAM (table
    pointers are GPAs, read straight from the partition's bank); for a
    baseline S2 domain, its private IOVA -> HPA table in bank 0."""
    with host.lock:
        part = host.partition(partition_id)
        dom = _domain(part, domain_id)
        if dom.table is not None:
            fmt = host.tables.fmt
            it = TableIterator(fmt, lambda a: host.memory.read_u64(Hpa(a)), int(dom.table.root),
                               max_tables=MAX_DUMP_TABLES)
            return _dump(fmt, it, ("IOVA", "HPA", "HPA"))
        if not (dom.configured and dom.translation_enabled and not dom.blocked):
            raise HvError(HvStatus.INVALID_PARAMETER,
                          f"domain {domain_id} has no stage-1 table (configured={dom.configured}, "
                          f"translation={dom.translation_enabled}, blocked={dom.blocked})")
        fs_fmt = X86_64Format(5 if dom.five_level else 4)
        ram = GuestRam(part.bank)
        it = TableIterator(fs_fmt, lambda a: ram.read_u64(Gpa(a)), int(dom.root), max_tables=MAX_DUMP_TABLES)
        try:
            return _dump(fs_fmt, it, ("IOVA", "GPA", "GPA"))
        except PviommuError as exc:  # the root itself is not RAM (cannot happen: configure checks it)
            raise HvError(HvStatus.INVALID_PARAMETER, f"stage-1 root {int(dom.root):#x}: {exc}") from exc


class Explainer:
    """Explains walks with an ``IommuUnit`` of its own over the host's memory
    (its IOTLB stays empty: every explanation is a full walk)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.unit = IommuUnit(host.memory)

    def explain(self, partition_id: int, iova: int, write: bool, *, logical_device_id: int = 0,
                domain_id: int = 0, pasid: int = 0) -> Explanation:
        """By device: the device's live context entry (what its unit reads);
        by domain: the context a device attached to it would get."""
        host = self.host
        with host.lock:
            if logical_device_id:
                dev = host.device(logical_device_id)
                if partition_id and dev.partition_id != partition_id:
                    raise HvError(HvStatus.ACCESS_DENIED,
                                  f"device {logical_device_id:#x} is not assigned to partition {partition_id}")
                return self.unit.explain(dev.slot, Iova(iova), write, pasid or None)
            if pasid:
                raise HvError(HvStatus.INVALID_PARAMETER, "a PASID is explained for a device, not a domain")
            if not domain_id:
                raise HvError(HvStatus.INVALID_PARAMETER, "name a device or a domain")
            part = host.partition(partition_id)
            ctx = host.context_for(part, _domain(part, domain_id))
            return self.unit.explain_context(ctx, Iova(iova), write, part.bank.index)
