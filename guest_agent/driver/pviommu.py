"""The para-virtual IOMMU driver, as each revision of the series writes it.

Mirrors ``hv_iommu_init`` / ``probe_device`` / ``attach_dev`` / ``release_device`` of the Linux
series; what differs between the RFC, v1 and v2 comes from ``pviommu.abi.revision`` (tables 1-3
of shared/reference/hyperv-series-revisions.md), so one driver is each revision's driver:

* init: GetIommuCapabilities(SELF); a failed call is -ENODEV in every revision (logged by v1/v2,
  silent in the RFC), PRESENT and S1 are needed, else ``IommuAbsent`` (or, only with
  ``allow_no_iommu``, DMA runs untranslated). The width is clamped to 48 without S1_5LVL; the RFC
  still takes its aperture from the reported width (its bug, kept). ``pgsize_bitmap``: the RFC
  takes it as given, v1 masks it to 4K/2M/1G (4K if nothing is left), v2 refuses to start if it is
  empty or has any other bit. ("Require 4 KiB" is the later tree L, not v2.) The identity domain
  (translation off) then the blocked domain (translation on + blocked) are real S1 domains created
  and configured once, so they get ids 1 and 2.
* probe: a device is handled only if GetLogicalDeviceProperty(PVIOMMU) has bit 0; ATS is enabled
  when offered; it gets a default paging DMA domain (CREATE, page-table init, CONFIGURE).
* attach: the current domain is tracked (same domain: nothing sent). RFC/v1: a device in another
  domain is DETACHed, the old domain flushed, then ATTACHed; v2 ATTACHes directly and never sends
  DETACH. Only SUCCESS counts. v2's blocking domain has its own op that WARNs and returns the
  status (so a failed ownership claim fails).
* release: the core moves the device to release_domain (the blocking domain) in every revision,
  then release_device: RFC detaches and clears dma_ops, v1 disables ATS and clears dma_ops, v2
  disables ATS.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from guest_agent.driver.baseline import BaselineDomain
from guest_agent.driver.domain import (
    BlockedDomain,
    DirectDomain,
    Domain,
    DomainKind,
    FlushMode,
    IdentityDomain,
    PagingDomain,
)
from guest_agent.driver.hypercalls import HvClient
from guest_agent.driver.stats import Stats
from guest_agent.errors import BusyError, HypercallFailed, InvalidRequest, IommuAbsent, NotFound
from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.revision import DEFAULT_REVISION, PgsizePolicy, Revision, profile
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
    iova_width: int  # as used by the tables (clamped to 48 without S1_5LVL)
    pgsize_bitmap: int  # as the revision keeps it (RFC: as given)
    five_level: bool
    #: the aperture is 0 .. 2**aperture_width - 1 (RFC: the reported width, not the clamped one)
    aperture_width: int = 0
    #: generic_pt top_level set by v1/v2 (4 if width > 48, else 3); None: the RFC leaves it unset
    top_level: int | None = None

    @property
    def levels(self) -> int:
        return 5 if self.five_level else 4

    @property
    def aperture_end(self) -> int:
        return (1 << (self.aperture_width or self.iova_width)) - 1


def decide(caps: hv.GetIommuCapabilitiesOutput | None, *, revision: Revision | str = DEFAULT_REVISION,
           allow_no_iommu: bool = False, detect_error: str = "") -> IommuGeometry | None:
    """The init decision of ``revision``'s hv_iommu_init: a geometry, None (run without an
    IOMMU, only when allowed), or ``IommuAbsent``. ``caps`` None: the capability call failed
    (``detect_error`` says how)."""
    facts = profile(revision).driver

    def absent(why: str) -> IommuGeometry | None:
        if allow_no_iommu:
            log.warning("iommu.absent", reason=why, mode="no-iommu", revision=str(revision))
            return None
        raise IommuAbsent(f"no usable para-virtual IOMMU: {why} (start with --allow-no-iommu to run without one)")

    need = hv.IommuCap.PRESENT | hv.IommuCap.S1
    if caps is None:
        return absent(f"GetIommuCapabilities failed{': ' + detect_error if detect_error else ''}")
    if caps.iommu_cap & need != need:
        return absent(f"iommu_cap {caps.iommu_cap:#x} lacks "
                      + "/".join(b.name or "" for b in (hv.IommuCap.PRESENT, hv.IommuCap.S1)
                                 if not caps.iommu_cap & b))
    given = caps.pgsize_bitmap
    if facts.pgsize_policy is PgsizePolicy.AS_GIVEN:
        pgsizes = given
    elif facts.pgsize_policy is PgsizePolicy.MASK_TO_FORMAT:
        pgsizes = given & FORMAT_PGSIZES or SZ_4K
    else:
        if not given or given & ~FORMAT_PGSIZES:
            return absent(f"unsupported page sizes: pgsize_bitmap={given:#x} (needs a non-empty subset of 4K/2M/1G)")
        pgsizes = given
    five = caps.has(hv.IommuCap.S1_5LVL) and caps.max_iova_width > WIDTH_4LVL
    width = caps.max_iova_width if five else min(caps.max_iova_width, WIDTH_4LVL)
    aperture = caps.max_iova_width if facts.aperture_from_reported_width else width
    top_level = (4 if width > WIDTH_4LVL else 3) if facts.sets_top_level else None
    return IommuGeometry(caps.iommu_cap, caps.max_iova_width, width, pgsizes, five, aperture, top_level)


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
    #: ATS enabled at probe when the capability offers it (every revision); off after v1/v2 release
    ats_enabled: bool = False
    #: dma_ops installed at probe (RFC/v1 only: JG asked v1 to drop set_dma_ops)
    dma_ops: bool = False
    #: release_device has run (the device left the driver)
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class PvIommu:
    """One guest's IOMMU driver instance, behaving as ``revision``'s driver."""

    def __init__(self, hvc: HvClient, ram: GuestRam, frames: FrameAllocator[Gpa], stats: Stats, *,
                 mode: FlushMode = FlushMode.STRICT, allow_no_iommu: bool = False,
                 revision: Revision | str = DEFAULT_REVISION) -> None:
        self.hv = hvc
        self.ram = ram
        self.frames = frames
        self.stats = stats
        self.mode = mode
        self.allow_no_iommu = allow_no_iommu
        self.revision = Revision.parse(revision)
        self.facts = profile(self.revision).driver
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
        caps: hv.GetIommuCapabilitiesOutput | None = None
        error = ""
        try:
            caps = self.hv.get_iommu_capabilities()
        except HypercallFailed as exc:  # -ENODEV in every revision
            error = HvStatus.name_of(exc.raw_status)
            if self.facts.caps_failure_logged:  # v1/v2: pr_err (MK: twice, on a host without the pvIOMMU)
                log.error("iommu.detect_failed", status=error, revision=self.revision.value)
            else:
                log.debug("iommu.detect_failed", status=error, revision=self.revision.value)
        self.geometry = decide(caps, revision=self.revision, allow_no_iommu=self.allow_no_iommu, detect_error=error)
        if self.geometry is not None:
            self.identity = self._static(IdentityDomain, hv.DeviceDomainSettings(translation_enabled=False))
            self.blocked = self._static(BlockedDomain, hv.DeviceDomainSettings(translation_enabled=True, blocked=True))
            log.info("iommu.init", revision=self.revision.value, iova_width=self.geometry.iova_width,
                     max_iova_width=self.geometry.max_iova_width, five_level=self.geometry.five_level,
                     pgsize_bitmap=hex(self.geometry.pgsize_bitmap), mode=self.mode.value)
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
                self.hv.create_domain(domain_type, domain_id, flags=self.facts.create_flags)
                return domain_id
            except HypercallFailed as exc:
                if exc.hv_status != HvStatus.INVALID_PARAMETER or "already exists" not in str(exc):
                    self.ida.free(domain_id)
                    raise
                log.info("domain.id_in_use", domain=domain_id)
        raise InvalidRequest("could not find a free device-domain id")

    def _static(self, cls: type[IdentityDomain] | type[BlockedDomain], settings: hv.DeviceDomainSettings) -> Domain:
        domain_id = self._fresh_id(cls, hv.DeviceDomainType.S1)
        self.hv.configure_domain(hv.DeviceDomainType.S1, domain_id, settings)
        dom = cls(domain_id, self.hv, self.stats)
        g = self.geometry
        if g is not None and self.facts.static_domains_have_geometry:  # RFC/v1; v2's static initializers don't
            dom.aperture = (0, g.aperture_end)
            dom.pgsize_bitmap = g.pgsize_bitmap
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
        dev.ats_enabled = bool(self.geometry.iommu_cap & hv.IommuCap.ATS)  # the DSA supports ATS
        dev.dma_ops = self.facts.sets_dma_ops
        dom = self.new_domain(DomainKind.PAGING)
        dev.default_domain = dom
        try:
            self.attach(dev, dom)
        except HypercallFailed as exc:
            if exc.hv_status != HvStatus.DEVICE_ALREADY_IN_DOMAIN or not self.facts.sends_detach:
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
                                       levels=g.levels, pgsize_bitmap=g.pgsize_bitmap & FORMAT_PGSIZES,
                                       iova_width=g.iova_width, mode=self.mode, aperture_width=g.aperture_width,
                                       revision=self.revision)
                    self.hv.configure_domain(hv.DeviceDomainType.S1, domain_id, dom.settings())
                except BaseException:
                    self._drop(domain_id, hv.DeviceDomainType.S1)
                    raise
            elif kind is DomainKind.BASELINE:
                if not g.iommu_cap & hv.IommuCap.S2:
                    raise InvalidRequest("the hypervisor offers no stage-2 (map-by-hypercall) domains: "
                                         "HV_IOMMU_CAP_S2 is clear (start it with --s2-baseline)")
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
        """The iommu core calling ``dom``'s attach_dev op (v2: the blocking domain's own op,
        whose failure fails the caller too)."""
        if self.geometry is None:
            raise IommuAbsent("no IOMMU: devices cannot change domains")
        if dom.kind is DomainKind.BLOCKED and self.facts.blocking_attach_own_op:
            status = self.blocking_attach(dev, dom)
            if status != HvStatus.SUCCESS:
                raise HypercallFailed(status, f"attaching device {dev.logical_device_id:#x} to the blocking domain "
                                              f"{dom.domain_id} failed: {HvStatus.name_of(status)}",
                                      call="AttachDeviceDomain")
            return
        self._attach_dev(dev, dom)

    def blocking_attach(self, dev: DeviceState, dom: Domain | None = None) -> int:
        """v2's blocking-domain attach op: it "cannot fail" short of a bug, so a failure WARNs,
        and the status is returned (a failed VFIO/iommufd ownership claim must fail)."""
        target = dom or self.blocked
        if target is None:
            raise IommuAbsent("no IOMMU")
        try:
            self._attach_dev(dev, target)
        except HypercallFailed as exc:
            self.stats.add("blocking_attach_failed")
            log.warning("iommu.blocking_attach_failed", warn=True, device=dev.logical_device_id,
                        domain=target.domain_id, status=HvStatus.name_of(exc.raw_status), error=str(exc))
            return exc.raw_status
        return int(HvStatus.SUCCESS)

    def _attach_dev(self, dev: DeviceState, dom: Domain) -> None:
        """hv_iommu_attach_dev of this revision."""
        with dev.lock:
            if dev.domain is dom:  # every revision tracks the current domain
                return
            old = dev.domain
            if old is not None and self.facts.detach_before_attach:
                # RFC/v1: DETACH, flush the old domain, then ATTACH. An error in between leaves
                # the device in no domain: the hypervisor blocks its DMA (JG's v1 objection).
                self.hv.detach(dev.logical_device_id)
                old.devices.discard(dev.logical_device_id)
                dev.domain = None
                old.flush()
            # v2: ATTACH directly; the hypervisor replaces the translation atomically.
            self.hv.attach(dom.hv_type, dom.domain_id, dev.logical_device_id, accept=self.facts.attach_accepts)
            if old is not None:
                old.devices.discard(dev.logical_device_id)
            dev.domain = dom
            dom.devices.add(dev.logical_device_id)
        self.stats.add("attaches")
        log.info("device.attached", device=dev.logical_device_id, domain=dom.domain_id, kind=dom.kind.value,
                 revision=self.revision.value)

    def detach(self, dev: DeviceState) -> None:
        """VFIO-style release: the device goes back to its default domain."""
        target = dev.default_domain or self.blocked
        if target is None:
            raise IommuAbsent("no IOMMU")
        self.attach(dev, target)

    def release(self, dev: DeviceState) -> None:
        """Device removal: the core first moves it to release_domain (the blocking domain, in
        every revision), then calls this revision's release_device."""
        if self.blocked is None:
            return
        self.attach(dev, self.blocked)
        if self.facts.release_detaches:  # RFC: detach (ATTACH and DETACH now balanced)
            with dev.lock:
                self.hv.detach(dev.logical_device_id)
                if dev.domain is not None:
                    dev.domain.devices.discard(dev.logical_device_id)
                dev.domain = None
        if self.facts.release_disables_ats:
            dev.ats_enabled = False
        if self.facts.release_clears_dma_ops:
            dev.dma_ops = False
        dev.released = True
        log.info("device.released", device=dev.logical_device_id, revision=self.revision.value)

    # -- teardown ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Leave the hypervisor clean, so a restarted agent starts from nothing (best effort):
        RFC/v1 detach every device and delete every domain; v2 sends no DETACH, so its devices
        stay on the blocking domain (the release domain), which is the one domain left."""
        if self.geometry is None:
            return
        for dev in self.devices.values():
            if dev.domain is None:
                continue
            try:
                if self.facts.sends_detach:
                    self.hv.detach(dev.logical_device_id)
                    dev.domain.devices.discard(dev.logical_device_id)
                    dev.domain = None
                elif self.blocked is not None:
                    self.attach(dev, self.blocked)
            except HypercallFailed as exc:
                log.warning("device.detach_failed", device=dev.logical_device_id, error=str(exc))
        for dom in list(self.domains.values()):
            if dom.devices:  # v2's blocking domain (or a domain a device could not leave): it stays
                continue
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
