"""The guest IOMMU hypercalls, one handler each.

Every handler takes the calling partition (from its credential, never from
the input) and the decoded input structure of ``pviommu.abi.hv``, checks
everything before changing anything, and either returns the output (and the
reps completed) or raises ``HvError`` with the status the guest sees. Both
the typed gRPC methods and the raw ``HvCall`` method end up here.

The revision (``HypervisorConfig.revision``, pviommu.abi.revision) decides what ATTACH of a
device that is already in a domain means: RFC/v1 refuse it (DEVICE_ALREADY_IN_DOMAIN, "detach it
first"); v2 atomically replaces the device's translation (the new context is written over the
old one, never through a blocked window, and the old domain's IOTLB entries are dropped before
the call returns), so attaching the blocking domain cannot fail for the old domain's state.

Statuses chosen where the reference is silent (see docs/security.md and docs/revisions.md):
  * ``partition_id`` other than SELF or the caller's own id -> ACCESS_DENIED;
  * owner VTL other than 0 -> INVALID_PARAMETER (no VTLs here);
  * unknown domain id -> INVALID_PARAMETER; id 0 or 0xFFFFFFFF -> INVALID_PARAMETER;
    creating an existing id -> INVALID_PARAMETER;
  * a stage-2 (type 0) domain from a guest without ``s2_baseline`` (HV_IOMMU_CAP_S2 clear)
    -> INVALID_PARAMETER, as for any domain type the partition is not offered;
    MapDeviceGpaPages / UnmapDeviceGpaPages (root-side calls) from a guest without it ->
    ACCESS_DENIED before anything is looked at (a known code the caller has no right to);
  * a device that does not exist -> INVALID_DEVICE_ID; another partition's
    device -> ACCESS_DENIED; detaching a device in no domain or deleting a
    domain with devices -> INVALID_DEVICE_STATE;
  * attaching a device that is in another domain: RFC/v1 -> DEVICE_ALREADY_IN_DOMAIN, v2 ->
    SUCCESS (replaced); attaching it to the domain it is already in -> DEVICE_ALREADY_IN_DOMAIN
    (``same_domain_attach``, or SUCCESS with nothing changed), in every revision;
  * blocked=1 with translation_enabled=0 -> INVALID_PARAMETER in every revision
    (``blocked_without_translation`` can accept it as blocked); translation_enabled=0 otherwise
    is identity, whatever root it carries (the root is ignored);
  * a stage-1 root that is not a page of the caller's RAM -> INVALID_PARAMETER;
    5-level paging without the capability -> INVALID_PARAMETER;
  * more domains than the limit -> INSUFFICIENT_DEVICE_DOMAINS;
  * a baseline CreateDeviceDomain or MapDeviceGpaPages rep that needs a bank-0 table frame beyond
    the partition's ``--table-quota`` -> INSUFFICIENT_MEMORY (reps before it stay done);
  * a device whose IOMMU unit is gone (no process serves it) -> INVALID_DEVICE_STATE.

A refused call changes nothing, HV_STATUS_TIME_OUT included: every handler
checks before it changes, and the changes that need a unit's confirmation
(context writes, flushes before freeing) are undone when the confirmation
does not come in time (``Host.set_device_domain``, ``reconfigure_domain``,
``delete_domain``; the baseline unmap re-maps what it removed). Only the
device's sync state remembers it: a unit that did not confirm is UNSYNCED and
is resynchronised before it may serve another partition. A unit whose
process is gone holds nothing, so it is skipped and the call succeeds.
Hypercalls of one partition run one at a time (``Partition.lock``); other
partitions' calls do not wait for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypervisor_svc.core.host import Host
from hypervisor_svc.core.model import Device, Domain, Partition
from hypervisor_svc.core.sva import SvaState
from pviommu.abi import hv
from pviommu.abi.hv import sva as sva_abi
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.revision import BlockedWithoutTranslation, SameDomainAttach
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE, Gpa, Iova, align_down
from pviommu.errors import HvError, PviommuError
from pviommu.log import get_logger

log = get_logger("hypercall")

S1 = hv.DeviceDomainType.S1
S2 = hv.DeviceDomainType.S2


@dataclass
class HvAnswer:
    output: hv.HvOutput | None = None
    reps_completed: int = 0


@dataclass(frozen=True)
class RawAnswer:
    """A raw hypercall's answer: the TLFS result value, the packed output, and why (refusals)."""

    result_value: int
    output: bytes = b""
    message: str = ""

    @property
    def status(self) -> int:
        return self.result_value & 0xFFFF


def _deny(message: str) -> HvError:
    return HvError(HvStatus.ACCESS_DENIED, message)


def _invalid(message: str) -> HvError:
    return HvError(HvStatus.INVALID_PARAMETER, message)


#: A hypercall's handler: the caller and its decoded input, to the answer.
Handler = Callable[[Partition, Any], "HvAnswer"]


class Hypercalls:
    def __init__(self, host: Host) -> None:
        self.host = host
        #: one handler per call code, the series' and the SVA proposal's (``dispatch`` looks nothing up by name)
        self.handlers: dict[int, Handler] = {
            hv.HvCallCode.GET_IOMMU_CAPABILITIES: self.do_get_iommu_capabilities,
            hv.HvCallCode.GET_LOGICAL_DEVICE_PROPERTY: self.do_get_logical_device_property,
            hv.HvCallCode.CREATE_DEVICE_DOMAIN: self.do_create_device_domain,
            hv.HvCallCode.DELETE_DEVICE_DOMAIN: self.do_delete_device_domain,
            hv.HvCallCode.ATTACH_DEVICE_DOMAIN: self.do_attach_device_domain,
            hv.HvCallCode.DETACH_DEVICE_DOMAIN: self.do_detach_device_domain,
            hv.HvCallCode.CONFIGURE_DEVICE_DOMAIN: self.do_configure_device_domain,
            hv.HvCallCode.FLUSH_DEVICE_DOMAIN: self.do_flush_device_domain,
            hv.HvCallCode.FLUSH_DEVICE_DOMAIN_LIST: self.do_flush_device_domain_list,
            hv.HvCallCode.MAP_DEVICE_GPA_PAGES: self.do_map_device_gpa_pages,
            hv.HvCallCode.UNMAP_DEVICE_GPA_PAGES: self.do_unmap_device_gpa_pages,
            sva_abi.SvaCallCode.ATTACH_DEVICE_PASID: self.do_attach_device_pasid,
            sva_abi.SvaCallCode.DETACH_DEVICE_PASID: self.do_detach_device_pasid,
            sva_abi.SvaCallCode.PROCESS_IOMMU_PRQ: self.do_process_iommu_prq,
        }

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, caller: Partition, request: hv.HvRequest | sva_abi.SvaInput) -> HvAnswer:
        """Run one decoded hypercall for ``caller``."""
        name = request.CODE.name
        handler = self.handlers[request.CODE]
        trace = self.host.trace
        try:
            with caller.lock:
                try:
                    answer: HvAnswer = handler(caller, request)
                except PviommuError as exc:  # HvError included
                    if trace is not None:  # under the lock: trace lines in execution order
                        trace.hypercall(caller, request, exc.hv_status, getattr(exc, "reps_completed", 0))
                    raise
                if trace is not None:
                    trace.hypercall(caller, request, HvStatus.SUCCESS, answer.reps_completed)
        except PviommuError as exc:
            self.host.counters.count_call(name, exc.hv_status)
            raise
        self.host.counters.count_call(name, HvStatus.SUCCESS)
        return answer

    def raw_call(self, caller: Partition, input_value: int, data: bytes) -> RawAnswer:
        """The raw ABI (TLFS input value + packed input block): decode, dispatch,
        encode. The one path of both ``HvCall`` (gRPC) and the hypercall page."""
        code = input_value & 0xFFFF
        try:
            decoded: hv.HvRequest | sva_abi.SvaInput
            if self.host.sva is not None and sva_abi.is_sva_code(code):  # the SVA proposal (off: unknown codes)
                decoded = sva_abi.decode_sva_call(input_value, data)
            else:
                decoded = hv.decode_call(input_value, data)
            answer = self.dispatch(caller, decoded)
            output = b"" if isinstance(decoded, sva_abi.SvaInput) else hv.encode_output(code, answer.output)
        except HvError as exc:
            self.host.counters.count(f"hv_status_{int(exc.hv_status):#x}")
            return RawAnswer(hv.HypercallResult(exc.hv_status, exc.reps_completed).encode(), b"", str(exc))
        except PviommuError as exc:
            return RawAnswer(hv.HypercallResult(exc.hv_status, 0).encode(), b"", str(exc))
        return RawAnswer(hv.HypercallResult(HvStatus.SUCCESS, answer.reps_completed).encode(), output)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _own(caller: Partition, partition_id: int) -> None:
        if partition_id not in (hv.HV_PARTITION_ID_SELF, caller.partition_id):
            raise _deny(f"partition {partition_id:#x} is not the caller's (use HV_PARTITION_ID_SELF)")

    def _domain_ref(self, caller: Partition, dd: hv.DeviceDomain) -> tuple[int, int]:
        self._own(caller, dd.partition_id)
        if dd.owner_vtl.target_vtl or dd.owner_vtl.use_target_vtl:
            raise _invalid("owner_vtl must be 0: this partition has no other VTL")
        dom_type, dom_id = dd.domain_id.type, dd.domain_id.id
        if dom_type not in (S1, S2):
            raise _invalid(f"domain type {dom_type} is not offered to a guest (S1 = 1, S2 baseline = 0)")
        if dom_id in (hv.HV_DEVICE_DOMAIN_ID_DEFAULT, hv.HV_DEVICE_DOMAIN_ID_NULL):
            raise _invalid(f"domain id {dom_id:#x} is reserved")
        return dom_type, dom_id

    def _domain(self, caller: Partition, dd: hv.DeviceDomain) -> Domain:
        dom_type, dom_id = self._domain_ref(caller, dd)
        dom = caller.domains.get(dom_id)
        if dom is None:
            raise _invalid(f"no device domain {dom_id} in partition {caller.partition_id}")
        if dom.domain_type != dom_type:
            raise _invalid(f"domain {dom_id} is of type {dom.domain_type}, not {dom_type}")
        return dom

    def _device(self, caller: Partition, device_id: hv.HvDeviceId) -> Device:
        if device_id.type != hv.HvDeviceType.LOGICAL:
            raise HvError(HvStatus.INVALID_DEVICE_ID, f"device id type {device_id.type} is not a logical id")
        dev = self.host.devices.get(device_id.id)
        if dev is None:
            raise HvError(HvStatus.INVALID_DEVICE_ID, f"no device {device_id.id:#x}")
        if dev.partition_id != caller.partition_id:
            raise _deny(f"device {device_id.id:#x} is not assigned to partition {caller.partition_id}")
        return dev

    # ------------------------------------------------------------------ capabilities
    def do_get_iommu_capabilities(self, caller: Partition, req: hv.GetIommuCapabilitiesInput) -> HvAnswer:
        self._own(caller, req.partition_id)
        cfg = self.host.config
        cap = hv.IommuCap.PRESENT | hv.IommuCap.S1
        if cfg.s2_baseline:  # the map-by-hypercall baseline design (a twin option)
            cap |= hv.IommuCap.S2
        if cfg.five_level:
            cap |= hv.IommuCap.S1_5LVL
        if cfg.pasid:
            cap |= hv.IommuCap.PASID
        if cfg.ats:
            cap |= hv.IommuCap.ATS
        if cfg.pri:
            cap |= hv.IommuCap.PRI
        out = hv.GetIommuCapabilitiesOutput(
            max_iova_width=cfg.iova_width if cfg.five_level else cfg.max_iova_width,
            max_pasid_width=cfg.max_pasid_width,
            iommu_cap=int(cap),
            pgsize_bitmap=cfg.pgsize_bitmap,
        )
        return HvAnswer(out)

    def do_get_logical_device_property(self, caller: Partition, req: hv.GetLogicalDevicePropertyInput) -> HvAnswer:
        self._own(caller, req.partition_id)
        if req.code != hv.HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU:
            raise HvError(HvStatus.UNKNOWN_PROPERTY, f"logical device property {req.code} is not known")
        self._device(caller, hv.HvDeviceId.from_u64(req.logical_device_id))
        return HvAnswer(hv.GetLogicalDevicePropertyOutput(hv.HV_DEVICE_IOMMU_ENABLED))

    # ------------------------------------------------------------------ domains
    def do_create_device_domain(self, caller: Partition, req: hv.CreateDeviceDomainInput) -> HvAnswer:
        dom_type, dom_id = self._domain_ref(caller, req.device_domain)
        if dom_type == S2 and not self.host.config.s2_baseline:
            # The capabilities do not advertise HV_IOMMU_CAP_S2: a stage-2 domain is a type this
            # partition is not offered, refused like any other (docs/revisions.md).
            raise _invalid("domain type 0 (stage 2) is not offered to this partition: HV_IOMMU_CAP_S2 is clear "
                           "(the map-by-hypercall baseline needs a hypervisor started with --s2-baseline)")
        if dom_id in caller.domains:
            raise _invalid(f"device domain {dom_id} already exists")
        if len(caller.domains) >= self.host.config.max_domains_per_partition:
            raise HvError(HvStatus.INSUFFICIENT_DEVICE_DOMAINS,
                          f"partition {caller.partition_id} holds {len(caller.domains)} domains, the limit")
        tag = self.host.alloc_tag()
        dom = Domain(caller.partition_id, dom_id, dom_type, tag,
                     flags=int(req.forward_progress_required) | int(req.inherit_owning_vtl) << 1)
        if dom_type == S2:
            try:
                dom.table = self.host.tables.new_baseline_table(caller.table_frames)
            except Exception:
                self.host.free_tag(tag)
                raise
            dom.configured = True
            dom.translation_enabled = True
        caller.domains[dom_id] = dom
        log.info("domain.created", partition=caller.partition_id, domain=dom_id, type=dom_type, tag=tag)
        return HvAnswer()

    def do_delete_device_domain(self, caller: Partition, req: hv.DeleteDeviceDomainInput) -> HvAnswer:
        dom = self._domain(caller, req.device_domain)
        if dom.devices:
            raise HvError(HvStatus.INVALID_DEVICE_STATE,
                          f"domain {dom.domain_id} still has {len(dom.devices)} device(s) attached; detach first")
        if dom.pasids:  # SVA proposal only
            raise HvError(HvStatus.INVALID_DEVICE_STATE,
                          f"domain {dom.domain_id} is attached to {len(dom.pasids)} PASID(s); detach them first")
        self.host.delete_domain(caller, dom)
        log.info("domain.deleted", partition=caller.partition_id, domain=dom.domain_id)
        return HvAnswer()

    def do_attach_device_domain(self, caller: Partition, req: hv.AttachDeviceDomainInput) -> HvAnswer:
        dom = self._domain(caller, req.device_domain)
        dev = self._device(caller, req.device_id)
        cfg = self.host.config
        if dev.domain_id == dom.domain_id:
            # Silent in every revision (drivers track the current domain and never send it); L
            # 2db30347 accepts DEVICE_ALREADY_IN_DOMAIN here, so that is the default answer.
            if cfg.same_domain_attach is SameDomainAttach.SUCCESS:
                return HvAnswer()  # nothing rewritten, nothing invalidated
            raise HvError(HvStatus.DEVICE_ALREADY_IN_DOMAIN,
                          f"device {dev.logical_device_id:#x} is already in domain {dom.domain_id}")
        replaced = dev.domain_id
        if replaced and not cfg.facts.attach_replaces:
            raise HvError(HvStatus.DEVICE_ALREADY_IN_DOMAIN,
                          f"device {dev.logical_device_id:#x} is in domain {dev.domain_id}; detach it first "
                          f"(revision {cfg.revision.value})")
        # v2 when ``replaced``: the new context is written over the old one directly (DMA uses the
        # old tables, then the new, never neither), then the old domain's IOTLB entries are
        # invalidated before this returns.
        self.host.set_device_domain(caller, dev, dom)
        log.info("domain.attached", partition=caller.partition_id, domain=dom.domain_id, device=dev.logical_device_id,
                 replaced=replaced or None)
        return HvAnswer()

    def do_detach_device_domain(self, caller: Partition, req: hv.DetachDeviceDomainInput) -> HvAnswer:
        self._own(caller, req.partition_id)
        dev = self._device(caller, req.device_id)
        if not dev.domain_id:
            raise HvError(HvStatus.INVALID_DEVICE_STATE, f"device {dev.logical_device_id:#x} is in no domain")
        self.host.set_device_domain(caller, dev, None)
        log.info("domain.detached", partition=caller.partition_id, device=dev.logical_device_id)
        return HvAnswer()

    def do_configure_device_domain(self, caller: Partition, req: hv.ConfigureDeviceDomainInput) -> HvAnswer:
        dom = self._domain(caller, req.device_domain)
        s = req.settings
        if dom.pasids:  # SVA proposal only: a PASID's table does not change under it
            raise HvError(HvStatus.INVALID_DEVICE_STATE,
                          f"domain {dom.domain_id} is attached to PASIDs; detach them before reconfiguring it")
        if dom.domain_type != S1:
            raise _invalid("only S1 domains are configured; a baseline S2 domain is mapped by MapDeviceGpaPages")
        if s.blocked and not s.translation_enabled and \
                self.host.config.blocked_without_translation is BlockedWithoutTranslation.REFUSE:
            # v2's comment and Yu's reply: the hypervisor requires blocked (and paging) domains to
            # keep translation_enabled set; clearing it bypasses translation, which suits only identity.
            raise _invalid("a blocked domain must keep translation_enabled set (clearing it lets DMA use GPAs "
                           "directly, which only suits an identity domain)")
        five = bool(s.first_stage_paging_mode)
        if s.translation_enabled and not s.blocked:
            if five and not self.host.config.five_level:
                raise _invalid("5-level first-stage paging is not offered (IOMMU_CAP_S1_5LVL clear)")
            root = int(s.page_table_root)
            if root % PAGE_SIZE:
                raise _invalid(f"stage-1 root {root:#x} is not page aligned")
            if not caller.gpa_backed(root, PAGE_SIZE):
                raise _invalid(f"stage-1 root {root:#x} is not in partition {caller.partition_id}'s RAM")
        def apply(d: Domain) -> None:
            d.configured = True
            d.translation_enabled = s.translation_enabled
            d.blocked = s.blocked
            d.five_level = five
            d.root = Gpa(int(s.page_table_root)) if s.translation_enabled else Gpa(0)

        self.host.reconfigure_domain(caller, dom, apply)
        log.info("domain.configured", partition=caller.partition_id, domain=dom.domain_id,
                 translation=s.translation_enabled, blocked=s.blocked, five_level=five, root=hex(dom.root))
        return HvAnswer()

    # ------------------------------------------------------------------ SVA proposal (not in the series)
    def _sva(self) -> SvaState:
        if self.host.sva is None:
            raise HvError(HvStatus.INVALID_HYPERCALL_CODE, "PASID calls are offered only with --proposal-sva")
        return self.host.sva

    def do_attach_device_pasid(self, caller: Partition, req: sva_abi.AttachDevicePasidInput) -> HvAnswer:
        sva = self._sva()
        dom = self._domain(caller, req.device_domain)
        dev = self._device(caller, req.device_id)
        if dom.domain_type != S1:
            raise _invalid(f"domain {dom.domain_id} is not an S1 domain")
        sva.attach(caller, dev, req.pasid, dom)
        return HvAnswer()

    def do_detach_device_pasid(self, caller: Partition, req: sva_abi.DetachDevicePasidInput) -> HvAnswer:
        sva = self._sva()
        self._own(caller, req.partition_id)
        sva.detach(caller, self._device(caller, req.device_id), req.pasid)
        return HvAnswer()

    def do_process_iommu_prq(self, caller: Partition, req: sva_abi.ProcessIommuPrqInput) -> HvAnswer:
        sva = self._sva()
        self._own(caller, req.partition_id)
        sva.respond(caller, self._device(caller, req.device_id), req.request_id, req.pasid, req.response)
        return HvAnswer()

    # ------------------------------------------------------------------ flushes
    def do_flush_device_domain(self, caller: Partition, req: hv.FlushDeviceDomainInput) -> HvAnswer:
        dom = self._domain(caller, req.device_domain)
        self.host.flush_domain(caller, dom)
        return HvAnswer()

    def do_flush_device_domain_list(self, caller: Partition, req: hv.FlushDeviceDomainListRequest) -> HvAnswer:
        dom = self._domain(caller, req.header.device_domain)
        done = req.rep_start
        for va in req.flush_vas[req.rep_start:]:
            if va.page_mask_shift > 52:
                raise HvError(HvStatus.INVALID_PARAMETER, f"element {done}: page mask shift {va.page_mask_shift} > 52")
            if va.page_number & ((1 << va.page_mask_shift) - 1):
                raise HvError(HvStatus.INVALID_PARAMETER,
                              f"element {done}: page {va.page_number:#x} is not aligned to 2^{va.page_mask_shift}")
            done += 1
        try:  # every element in one batch, one wait per unit
            self.host.flush_pages(caller, dom, [(Iova(va.page_number << PAGE_SHIFT), va.page_mask_shift)
                                                for va in req.flush_vas[req.rep_start:]])
        except HvError as exc:
            exc.reps_completed = req.rep_start  # none is known done
            raise
        return HvAnswer(reps_completed=done)

    # ------------------------------------------------------------------ baseline map/unmap
    def _root_side(self, call: str) -> None:
        """Map/UnmapDeviceGpaPages belong to the root; a guest may use them only when the
        baseline design is switched on. Otherwise ACCESS_DENIED: the code is known (the root
        uses it), the caller lacks the right -- the TLFS meaning of the status, and what KVM's
        Hyper-V emulation answers for a call the partition has no privilege for."""
        if not self.host.config.s2_baseline:
            raise _deny(f"{call} is a root-partition hypercall; guests may use it only on a hypervisor started "
                        "with --s2-baseline (HV_IOMMU_CAP_S2)")

    def do_map_device_gpa_pages(self, caller: Partition, req: hv.MapDeviceGpaPagesRequest) -> HvAnswer:
        self._root_side("MapDeviceGpaPages")
        h = req.header
        dom = self._domain(caller, h.device_domain)
        if dom.table is None:
            raise _invalid(f"domain {dom.domain_id} is not a stage-2 (map-by-hypercall) domain")
        if h.target_vtl.target_vtl or h.target_vtl.use_target_vtl:
            raise _invalid("target_vtl must be 0")
        if not h.map_flags:
            raise _invalid("map_flags must grant READABLE and/or WRITABLE")
        base = int(h.target_device_va_base)
        if base % PAGE_SIZE:
            raise _invalid(f"target_device_va_base {base:#x} is not page aligned")
        writable = bool(h.map_flags & hv.MapFlags.WRITABLE)
        done = req.rep_start
        try:
            for i in range(req.rep_start, req.rep_count):
                gpa = req.gpa_page_list[i] << PAGE_SHIFT
                if not caller.gpa_backed(gpa, PAGE_SIZE):
                    raise _invalid(f"rep {i}: GPA page {req.gpa_page_list[i]:#x} is not RAM of the partition")
                if writable and any(r <= gpa < r + n for r, n in caller.read_only):
                    raise _deny(f"rep {i}: GPA {gpa:#x} is read-only for this partition")
                self.host.tables.map_baseline(dom.table, caller.stage2, Iova(base + i * PAGE_SIZE), Gpa(gpa),
                                              readable=bool(h.map_flags & hv.MapFlags.READABLE), writable=writable)
                dom.mapped_pages += 1
                done += 1
        except HvError as exc:
            exc.reps_completed = done
            raise
        return HvAnswer(reps_completed=done)

    def do_unmap_device_gpa_pages(self, caller: Partition, req: hv.UnmapDeviceGpaPagesRequest) -> HvAnswer:
        self._root_side("UnmapDeviceGpaPages")
        dom = self._domain(caller, req.input.device_domain)
        if dom.table is None:
            raise _invalid(f"domain {dom.domain_id} is not a stage-2 (map-by-hypercall) domain")
        base = int(req.input.target_device_va_base)
        if base % PAGE_SIZE:
            raise _invalid(f"target_device_va_base {base:#x} is not page aligned")
        start = base + req.rep_start * PAGE_SIZE
        count = req.rep_count - req.rep_start
        table = dom.table
        removed = [(Iova(start + i * PAGE_SIZE), tr) for i in range(count)
                   if (tr := table.lookup(Iova(start + i * PAGE_SIZE))) is not None]
        unmapped, freed = self.host.tables.unmap_baseline(table, Iova(start), count * PAGE_SIZE)
        # The hypervisor owns this table, so it flushes before freeing its pages.
        mask = max(0, (count - 1).bit_length())
        aligned = Iova(align_down(start, PAGE_SIZE << mask))
        try:
            if aligned + (PAGE_SIZE << mask) < start + count * PAGE_SIZE:
                self.host.flush_domain(caller, dom)
            else:
                self.host.flush_pages(caller, dom, [(aligned, mask)])
        except HvError as exc:  # not confirmed: put the mappings back, as if nothing happened
            for iova, tr in removed:
                table.map(iova, tr.oa, 1 << tr.size_lg2, tr.perm)
            self.host.tables.free_gathered(caller.table_frames, freed)
            exc.reps_completed = req.rep_start
            raise
        dom.mapped_pages -= unmapped // PAGE_SIZE
        self.host.tables.free_gathered(caller.table_frames, freed)
        return HvAnswer(reps_completed=req.rep_count)
