"""The para-virtual IOMMU driver: detection, static domains, probe, attach.

Mirrors ``hv_iommu_init`` / ``probe_device`` / ``attach_dev`` of the Linux RFC
(reference hyperv-guest-iommu.md section 2), with its known bug fixed: the
aperture follows the *clamped* IOVA width, not the reported one.

* init: GetIommuCapabilities(SELF) needs PRESENT and S1, else ``IommuAbsent``
  (or, only with ``allow_no_iommu``, DMA runs untranslated). The width is
  clamped to 48 without S1_5LVL. The identity domain (translation off) and
  the blocked domain (translation on + blocked) are real S1 domains created
  and configured once.
* probe: a device is handled only if GetLogicalDeviceProperty(PVIOMMU) has
  bit 0; it gets a default paging DMA domain of its own (Linux default domain
  per group), whose stage-1 tables live in guest RAM.
* attach: detach from the previous domain first (the hypervisor refuses to
  attach a device that is in a domain), then attach.
* release: the blocked domain (``release_domain``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from guest_agent.driver.domain import (
    BaselineDomain,
    BlockedDomain,
    DirectDomain,
    Domain,
    DomainKind,
    FlushMode,
    IdentityDomain,
    PagingDomain,
)
from guest_agent.driver.hypercalls import DomainSettings, HvClient, IommuCaps
from guest_agent.driver.stats import Stats
from guest_agent.errors import BusyError, HypercallFailed, InvalidRequest, IommuAbsent, NotFound
from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import SZ_1G, SZ_2M, SZ_4K, Gpa
from pviommu.log import get_logger
from pviommu.mem.bank import GuestRam
from pviommu.mem.frames import FrameAllocator

log = get_logger("guest.iommu")

#: The 4-level limit: wider needs IOMMU_CAP_S1_5LVL.
WIDTH_4LVL = 48
#: Leaf sizes the x86-64 stage-1 format can build.
FORMAT_PGSIZES = SZ_4K | SZ_2M | SZ_1G
DOMAIN_ID_FIRST = hv.HV_DEVICE_DOMAIN_ID_DEFAULT + 1
DOMAIN_ID_LAST = hv.HV_DEVICE_DOMAIN_ID_NULL - 1


@dataclass(frozen=True)
class IommuGeometry:
    """What the driver uses, decided once from the capabilities."""

    iommu_cap: int
    max_iova_width: int  # as reported
    iova_width: int  # as used
    pgsize_bitmap: int
    five_level: bool

    @property
    def levels(self) -> int:
        return 5 if self.five_level else 4


def decide(caps: IommuCaps | None, *, allow_no_iommu: bool = False) -> IommuGeometry | None:
    """The init decision of hv_iommu_init: a geometry, None (run without an
    IOMMU, only when allowed), or ``IommuAbsent``."""
    need = hv.IommuCap.PRESENT | hv.IommuCap.S1
    if caps is None or caps.iommu_cap & need != need:
        why = ("GetIommuCapabilities is not implemented" if caps is None
               else f"iommu_cap {caps.iommu_cap:#x} lacks "
               + "/".join(b.name or "" for b in (hv.IommuCap.PRESENT, hv.IommuCap.S1) if not caps.iommu_cap & b))
        if allow_no_iommu:
            log.warning("iommu.absent", reason=why, mode="no-iommu")
            return None
        raise IommuAbsent(f"no usable para-virtual IOMMU: {why} (start with --allow-no-iommu to run without one)")
    five = caps.has(hv.IommuCap.S1_5LVL) and caps.max_iova_width > WIDTH_4LVL
    width = caps.max_iova_width if five else min(caps.max_iova_width, WIDTH_4LVL)
    pgsizes = caps.pgsize_bitmap & FORMAT_PGSIZES
    if not pgsizes & SZ_4K:
        raise IommuAbsent(f"pgsize_bitmap {caps.pgsize_bitmap:#x} lacks 4 KiB pages")
    return IommuGeometry(caps.iommu_cap, caps.max_iova_width, width, pgsizes, five)


class Ida:
    """Lowest-free id allocator over [first, last] (Linux IDA)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def alloc(self) -> int:
        with self._lock:
            i = self.first
            while i in self._used:
                i += 1
            if i > self.last:
                raise InvalidRequest("no free domain id")
            self._used.add(i)
            return i

    def free(self, i: int) -> None:
        with self._lock:
            self._used.discard(i)


@dataclass
class DeviceState:
    logical_device_id: int
    name: str
    control_address: str
    behind_pviommu: bool = False
    domain: Domain | None = None
    default_domain: Domain | None = None
    index: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class PvIommu:
    """One guest's IOMMU driver instance."""

    def __init__(self, hvc: HvClient, ram: GuestRam, frames: FrameAllocator[Gpa], stats: Stats, *,
                 mode: FlushMode = FlushMode.STRICT, allow_no_iommu: bool = False) -> None:
        self.hv = hvc
        self.ram = ram
        self.frames = frames
        self.stats = stats
        self.mode = mode
        self.allow_no_iommu = allow_no_iommu
        self.geometry: IommuGeometry | None = None
        self.ida = Ida(DOMAIN_ID_FIRST, DOMAIN_ID_LAST)
        self.domains: dict[int, Domain] = {}
        self.devices: dict[int, DeviceState] = {}
        self.identity: Domain | None = None
        self.blocked: Domain | None = None
        self._lock = threading.RLock()

    # -- init ---------------------------------------------------------------------
    def init(self) -> None:
        """Detect, create the static domains, probe every offered device."""
        try:
            caps: IommuCaps | None = self.hv.get_iommu_capabilities()
        except HypercallFailed as exc:
            if exc.raw_status != HvStatus.INVALID_HYPERCALL_CODE:
                raise
            caps = None  # later Linux drivers: INVALID_HYPERCALL_CODE -> -ENODEV
        self.geometry = decide(caps, allow_no_iommu=self.allow_no_iommu)
        if self.geometry is not None:
            self.identity = self._static(IdentityDomain, DomainSettings(translation_enabled=False))
            self.blocked = self._static(BlockedDomain, DomainSettings(translation_enabled=True, blocked=True))
            log.info("iommu.init", iova_width=self.geometry.iova_width, max_iova_width=self.geometry.max_iova_width,
                     five_level=self.geometry.five_level, pgsize_bitmap=hex(self.geometry.pgsize_bitmap),
                     mode=self.mode.value)
        self.rescan()

    def rescan(self) -> list[int]:
        """Probe devices assigned since the last scan (hot-plug: in container
        and Kubernetes set-ups devices are assigned after the guest boots);
        returns the new ones. Devices taken away stay known but fail at use."""
        new = []
        with self._lock:
            for info in self.hv.list_devices():
                if info.logical_device_id in self.devices:
                    continue
                dev = DeviceState(info.logical_device_id, info.name, info.control_address, index=len(self.devices))
                self.devices[dev.logical_device_id] = dev
                self.probe(dev)
                new.append(dev.logical_device_id)
        return new

    def _fresh_id(self, create: type[Domain] | None, domain_type: int) -> int:
        """Allocate an id and create the hypervisor domain; an id left over by a
        previous agent instance (refused as existing) is skipped."""
        for _ in range(256):
            domain_id = self.ida.alloc()
            try:
                self.hv.create_domain(domain_type, domain_id)
                return domain_id
            except HypercallFailed as exc:
                if exc.hv_status != HvStatus.INVALID_PARAMETER or "already exists" not in str(exc):
                    self.ida.free(domain_id)
                    raise
                log.info("domain.id_in_use", domain=domain_id)
        raise InvalidRequest("could not find a free device-domain id")

    def _static(self, cls: type[IdentityDomain] | type[BlockedDomain], settings: DomainSettings) -> Domain:
        domain_id = self._fresh_id(cls, hv.DeviceDomainType.S1)
        self.hv.configure_domain(hv.DeviceDomainType.S1, domain_id, settings)
        dom = cls(domain_id, self.hv, self.stats)
        self.domains[domain_id] = dom
        return dom

    # -- probe ---------------------------------------------------------------------
    def probe(self, dev: DeviceState) -> None:
        if self.geometry is None:
            dev.domain = dev.default_domain = DirectDomain(0, None, self.stats)
            return
        try:
            prop = self.hv.get_logical_device_property(dev.logical_device_id)
        except HypercallFailed as exc:
            log.warning("device.probe_refused", device=dev.logical_device_id, error=str(exc))
            return
        dev.behind_pviommu = bool(prop & hv.HV_DEVICE_IOMMU_ENABLED)
        if not dev.behind_pviommu:
            log.info("device.not_behind_pviommu", device=dev.logical_device_id)
            return
        dom = self.new_domain(DomainKind.PAGING)
        dev.default_domain = dom
        try:
            self.attach(dev, dom)
        except HypercallFailed as exc:
            if exc.hv_status != HvStatus.DEVICE_ALREADY_IN_DOMAIN:
                raise
            self.hv.detach(dev.logical_device_id)  # left attached by a previous agent instance
            self.attach(dev, dom)
        log.info("device.probed", device=dev.logical_device_id, name=dev.name, domain=dom.domain_id)

    # -- domains ---------------------------------------------------------------------
    def new_domain(self, kind: DomainKind) -> Domain:
        """A new paging (nested) or baseline (map-by-hypercall) domain."""
        g = self.geometry
        if g is None:
            raise IommuAbsent("no IOMMU: only direct DMA is possible")
        dom: Domain
        with self._lock:
            if kind is DomainKind.PAGING:
                domain_id = self._fresh_id(PagingDomain, hv.DeviceDomainType.S1)
                try:
                    dom = PagingDomain(domain_id, self.hv, self.stats, ram=self.ram, frames=self.frames,
                                       levels=g.levels, pgsize_bitmap=g.pgsize_bitmap, iova_width=g.iova_width,
                                       mode=self.mode)
                    self.hv.configure_domain(hv.DeviceDomainType.S1, domain_id, dom.settings())
                except BaseException:
                    self._drop(domain_id, hv.DeviceDomainType.S1)
                    raise
            elif kind is DomainKind.BASELINE:
                domain_id = self._fresh_id(BaselineDomain, hv.DeviceDomainType.S2)
                dom = BaselineDomain(domain_id, self.hv, self.stats, iova_limit=1 << (g.iova_width - 1),
                                     mode=self.mode)
            else:
                raise InvalidRequest(f"cannot create a {kind.value} domain (only paging or baseline)")
            self.domains[domain_id] = dom
        self.stats.add(f"domains_created_{kind.value}")
        log.info("domain.created", domain=domain_id, kind=kind.value, root=hex(dom.root_gpa))
        return dom

    def _drop(self, domain_id: int, domain_type: int) -> None:
        try:
            self.hv.delete_domain(domain_type, domain_id)
        except HypercallFailed as exc:
            log.warning("domain.delete_failed", domain=domain_id, error=str(exc))
        self.ida.free(domain_id)

    def domain(self, domain_id: int) -> Domain:
        dom = self.domains.get(domain_id)
        if dom is None:
            raise NotFound(f"no domain {domain_id} in this guest")
        return dom

    def device(self, logical_device_id: int) -> DeviceState:
        dev = self.devices.get(logical_device_id)
        if dev is None and self.rescan():
            dev = self.devices.get(logical_device_id)
        if dev is None:
            raise NotFound(f"no device {logical_device_id:#x} in this guest", hv_status=HvStatus.INVALID_DEVICE_ID)
        return dev

    def delete_domain(self, dom: Domain) -> None:
        with self._lock:
            if dom.static:
                raise BusyError(f"domain {dom.domain_id} is a static {dom.kind.value} domain")
            if dom.devices:
                raise BusyError(f"domain {dom.domain_id} still has device(s) "
                                f"{', '.join(hex(d) for d in sorted(dom.devices))}; detach first")
            if any(d.default_domain is dom for d in self.devices.values()):
                raise BusyError(f"domain {dom.domain_id} is a device's default domain")
            self.hv.delete_domain(dom.hv_type, dom.domain_id)
            del self.domains[dom.domain_id]
            self.ida.free(dom.domain_id)
        dom.destroy()  # the hypervisor forgot it: no IOMMU can walk its tables now
        log.info("domain.deleted", domain=dom.domain_id)

    # -- attach ------------------------------------------------------------------------
    def attach(self, dev: DeviceState, dom: Domain) -> None:
        """Detach from the current domain first, then attach (hv attach_dev)."""
        if self.geometry is None:
            raise IommuAbsent("no IOMMU: devices cannot change domains")
        with dev.lock:
            if dev.domain is dom:
                return
            old = dev.domain
            if old is not None:
                self.hv.detach(dev.logical_device_id)
                old.devices.discard(dev.logical_device_id)
                dev.domain = None
            self.hv.attach(dom.hv_type, dom.domain_id, dev.logical_device_id)
            dev.domain = dom
            dom.devices.add(dev.logical_device_id)
        self.stats.add("attaches")
        log.info("device.attached", device=dev.logical_device_id, domain=dom.domain_id, kind=dom.kind.value)

    def detach(self, dev: DeviceState) -> None:
        """VFIO-style release: the device goes back to its default domain."""
        target = dev.default_domain or self.blocked
        if target is None:
            raise IommuAbsent("no IOMMU")
        self.attach(dev, target)

    def release(self, dev: DeviceState) -> None:
        """Linux release_domain: the blocked domain."""
        if self.blocked is not None:
            self.attach(dev, self.blocked)

    # -- teardown ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Leave the hypervisor clean: devices detached, every domain deleted,
        so a restarted agent starts from nothing (best effort)."""
        if self.geometry is None:
            return
        for dev in self.devices.values():
            if dev.domain is not None:
                try:
                    self.hv.detach(dev.logical_device_id)
                except HypercallFailed as exc:
                    log.warning("device.detach_failed", device=dev.logical_device_id, error=str(exc))
                dev.domain.devices.discard(dev.logical_device_id)
                dev.domain = None
        for dom in list(self.domains.values()):
            try:
                self.hv.delete_domain(dom.hv_type, dom.domain_id)
            except HypercallFailed as exc:
                log.warning("domain.delete_failed", domain=dom.domain_id, error=str(exc))
            dom.destroy()
        self.domains.clear()

    def table_frames(self) -> int:
        return sum(d.table_pages for d in self.domains.values())

    def iova_allocated(self) -> int:
        return sum(d.iovad.allocated_pages for d in self.domains.values() if d.iovad is not None)
