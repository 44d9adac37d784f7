"""PASID attach/detach and page-group responses: pviommu proposal, not in the series.

Made only with ``--proposal-sva`` (``HypervisorConfig.proposal_sva``); without it the host
has no ``sva`` and nothing here runs. Layouts: ``pviommu.abi.hv.sva``; statuses and reasoning:
docs/proposal-sva.md. The structures (SM context entry, PASID directory and tables) are
written with ``pviommu.iommu.pasid.PasidTables`` in bank 0; every device gets a directory
when it registers. A PASID entry is the nested context an S1 domain would give the device
(the domain's stage-1 root over the partition's stage 2), tagged with the domain's DID.

Statuses (checked before anything changes):
  * PASID 0 (RID_PASID: the device's DMA-API domain, use AttachDeviceDomain) or one beyond
    ``max_pasid_width`` -> INVALID_PARAMETER;
  * a domain that is not a configured, translating, unblocked S1 domain -> INVALID_PARAMETER;
  * attaching (device, PASID) to the domain it is in -> DEVICE_ALREADY_IN_DOMAIN;
    to another domain -> replaced in one step (as v2's attach);
  * detaching a PASID that is not attached -> INVALID_DEVICE_STATE;
  * a page-group response for a request that is not pending for the caller in the current
    epoch (unknown, answered already = a duplicate, or from before an ownership change)
    -> PAGE_REQUEST_INVALID; for another partition's device -> ACCESS_DENIED; naming another
    PASID than the request's -> INVALID_PARAMETER; for a PASID no longer attached ->
    PAGE_REQUEST_INVALID (the device was answered "invalid" when it was detached).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pviommu.abi.hv.sva import PrqResponse
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import PageResponse, PageResponseCode, PasidInvalidation, QueueItem
from pviommu.abi.prq import FaultMessage, PageRequestMessage
from pviommu.addr import PAGE_SIZE
from pviommu.errors import HvError, UnitGone, UnitStalled
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.pasid import PASID_DIR_ENTRY_SIZE, PASID_TABLE_ENTRIES, PasidTables
from pviommu.log import get_logger

if TYPE_CHECKING:
    from hypervisor_svc.core.host import Host
    from hypervisor_svc.core.model import Device, Domain, Partition

log = get_logger("sva")

#: one 4 KiB PASID directory per device: PDTS 2 = 512 entries x 64 PASIDs = 15 bits
PDTS = 2
PASID_WIDTH = (PAGE_SIZE // PASID_DIR_ENTRY_SIZE * PASID_TABLE_ENTRIES - 1).bit_length()
_PRQ_CODES = {PrqResponse.SUCCESS: PageResponseCode.SUCCESS, PrqResponse.INVALID: PageResponseCode.INVALID,
              PrqResponse.FAILURE: PageResponseCode.FAILURE}


class SvaState:
    """The host's PASID bookkeeping: bindings live on ``Device.pasids`` and
    ``Domain.pasids``; pending page requests' PASIDs here."""

    def __init__(self, host: Host) -> None:
        self.host = host
        frames = host.tables.frames
        self.tables = PasidTables(host.memory, frames.alloc_table, frames.free_table)
        self.tables.enable()
        self.width = min(host.config.max_pasid_width or PASID_WIDTH, PASID_WIDTH)
        #: (logical device, request id) -> PASID of a pending page request
        self.request_pasids: dict[tuple[int, int], int] = {}

    # -- device lifecycle (host hooks) -------------------------------------------------
    def add_device(self, dev: Device) -> None:
        self.tables.add_device(dev.slot, pdts=PDTS, pri=True)

    def remove_device(self, dev: Device, part: Partition | None) -> None:
        self._forget_bindings(dev, part)
        self.tables.remove_device(dev.slot)

    def reset_device(self, dev: Device, old: Partition | None) -> None:
        """An ownership change: every PASID binding of the old owner goes (the new
        epoch already fences its translations into the old owner's bank)."""
        had = bool(dev.pasids)
        self._forget_bindings(dev, old)
        self.tables.add_device(dev.slot, pdts=PDTS, pri=True)
        if had and dev.reachable:  # entries cached after the fence but before this reset go too
            try:
                self.host.units.link.post(dev, [PasidInvalidation(True, None, None)])
            except (UnitGone, UnitStalled) as exc:
                log.info("pasid.reset_unannounced", device=dev.logical_device_id, error=str(exc))

    def _forget_bindings(self, dev: Device, part: Partition | None) -> None:
        if part is not None:
            for pasid, dom_id in dev.pasids.items():
                dom = part.domains.get(dom_id)
                if dom is not None:
                    dom.pasids.discard((dev.logical_device_id, pasid))
        dev.pasids.clear()
        for key in [k for k in self.request_pasids if k[0] == dev.logical_device_id]:
            del self.request_pasids[key]

    # -- hypercalls (caller holds part.lock) ---------------------------------------------
    def _check_pasid(self, pasid: int) -> None:
        if pasid == 0:
            raise HvError(HvStatus.INVALID_PARAMETER,
                          "PASID 0 is RID_PASID, the device's own domain: use AttachDeviceDomain")
        if pasid >> self.width:
            raise HvError(HvStatus.INVALID_PARAMETER, f"PASID {pasid:#x} exceeds max_pasid_width {self.width}")

    def attach(self, part: Partition, dev: Device, pasid: int, dom: Domain) -> None:
        self._check_pasid(pasid)
        if dom.table is not None or not dom.configured or not dom.translation_enabled or dom.blocked:
            raise HvError(HvStatus.INVALID_PARAMETER, f"domain {dom.domain_id} is not a configured, translating, "
                                                      "unblocked S1 domain (a PASID walks its stage-1 table)")
        old_id = dev.pasids.get(pasid)
        if old_id == dom.domain_id:
            raise HvError(HvStatus.DEVICE_ALREADY_IN_DOMAIN,
                          f"PASID {pasid:#x} of device {dev.logical_device_id:#x} is in domain {dom.domain_id}")
        old = part.domains.get(old_id) if old_id is not None else None
        entry = self.host.context_for(part, dom)
        items: list[QueueItem] = [PasidInvalidation(True, old.tag if old else dom.tag, pasid)]
        if old is not None:
            items.append(PasidInvalidation(False, old.tag, pasid))
        # and whatever the unit still holds under the new (tag, PASID): an IOTLB entry that DMA
        # cached between a reset's fence and reset_device outlives both, and the tag may be reused
        items.append(PasidInvalidation(False, dom.tag, pasid))
        self._write(dev, pasid, entry, items, old, part)
        if old is not None:
            old.pasids.discard((dev.logical_device_id, pasid))
        dev.pasids[pasid] = dom.domain_id
        dom.pasids.add((dev.logical_device_id, pasid))
        dev.tags.add(dom.tag)
        log.info("pasid.attached", device=dev.logical_device_id, pasid=pasid, domain=dom.domain_id)

    def detach(self, part: Partition, dev: Device, pasid: int) -> None:
        self._check_pasid(pasid)
        dom_id = dev.pasids.get(pasid)
        dom = part.domains.get(dom_id) if dom_id is not None else None
        if dom is None:
            raise HvError(HvStatus.INVALID_DEVICE_STATE,
                          f"PASID {pasid:#x} of device {dev.logical_device_id:#x} is attached to no domain")
        items: list[QueueItem] = [PasidInvalidation(True, dom.tag, pasid), PasidInvalidation(False, dom.tag, pasid)]
        self._write(dev, pasid, ContextEntry.blocked(), items, dom, part)
        del dev.pasids[pasid]
        dom.pasids.discard((dev.logical_device_id, pasid))
        # requests of that PASID still waiting: the device hears "invalid" now, the guest's late answer is refused
        for (logical, rid), p in list(self.request_pasids.items()):
            if logical == dev.logical_device_id and p == pasid:
                del self.request_pasids[(logical, rid)]
                if dev.page_requests.pop(rid, None) is not None:
                    try:
                        self.host.units.link.post(dev, [PageResponse(dev.slot, rid, PageResponseCode.INVALID)])
                    except (UnitGone, UnitStalled) as exc:
                        log.info("pasid.detach_unanswered", device=dev.logical_device_id, error=str(exc))
        log.info("pasid.detached", device=dev.logical_device_id, pasid=pasid, domain=dom.domain_id)

    def _write(self, dev: Device, pasid: int, entry: ContextEntry, items: list[QueueItem],
               old: Domain | None, part: Partition) -> None:
        """Write the PASID entry and have the unit confirm; TIME_OUT puts the old entry back."""
        before = self.host.context_for(part, old) if old is not None else ContextEntry.blocked()
        self.tables.set_entry(dev.slot, pasid, entry)
        if not dev.reachable:
            return
        try:
            self.host.units.tell(dev, items)
        except HvError:
            self.tables.set_entry(dev.slot, pasid, before)
            raise

    def note_page_request(self, dev: Device, request_id: int, pasid: int) -> None:
        self.request_pasids[(dev.logical_device_id, request_id)] = pasid

    def report(self, dev: Device, request_id: int, pasid: int, page_request: bool, address: int, write: bool,
               reason: int) -> dict[str, Any]:
        """A PASID-tagged fault or page request the device reported (already
        accepted for the owner): the fault-log fields that carry it to the guest
        as an X64IommuPrq or IommuFault SynIC message."""
        if page_request:
            with self.host.lock:
                if request_id in dev.page_requests:
                    self.note_page_request(dev, request_id, pasid)
            message = PageRequestMessage(dev.logical_device_id, request_id, address, pasid, write).pack()
        else:
            message = FaultMessage(dev.logical_device_id, address, pasid, reason, write).pack()
        return {"pasid": pasid, "synic_message": message}

    def respond(self, caller: Partition, dev: Device, request_id: int, pasid: int, response: PrqResponse) -> None:
        pending = dev.page_requests.get(request_id)
        if pending is None or pending != (caller.partition_id, dev.epoch):
            raise HvError(HvStatus.PAGE_REQUEST_INVALID,
                          f"no page request {request_id} of device {dev.logical_device_id:#x} is pending for this "
                          "partition (unknown, answered already, or from before an ownership change)")
        asked = self.request_pasids.get((dev.logical_device_id, request_id))
        if asked is None:
            raise HvError(HvStatus.PAGE_REQUEST_INVALID, f"page request {request_id} carried no PASID")
        if asked != pasid:
            raise HvError(HvStatus.INVALID_PARAMETER,
                          f"page request {request_id} is of PASID {asked:#x}, not {pasid:#x}")
        if pasid not in dev.pasids:
            raise HvError(HvStatus.PAGE_REQUEST_INVALID, f"PASID {pasid:#x} is no longer attached")
        del dev.page_requests[request_id]
        del self.request_pasids[(dev.logical_device_id, request_id)]
        try:
            self.host.units.link.post(dev, [PageResponse(dev.slot, request_id, _PRQ_CODES[response])])
        except (UnitGone, UnitStalled) as exc:
            raise HvError(HvStatus.PAGE_REQUEST_INVALID, f"device {dev.logical_device_id:#x}: {exc}") from exc
