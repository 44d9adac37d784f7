"""Device domains on the host: tags, a device's context, attach and replace, reconfigure, delete, flushes.

A ``Host`` mixin, not a component: the hypercall layer calls these on the host by name, and they read its
device map and take its tag pool under its lock; a component would need Host to forward every call."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hypervisor_svc.core import stage2
from hypervisor_svc.core.model import Device, Domain, Partition, Sync
from hypervisor_svc.core.state import HostState
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import Invalidation, QueueItem
from pviommu.addr import Gpa, Iova
from pviommu.errors import HvError
from pviommu.iommu.context import ContextEntry


class DomainOps(HostState):
    """Domain operations; the caller holds the partition's lock."""

    def alloc_tag(self) -> int:
        with self.lock:
            if not self._free_tags:
                raise HvError(HvStatus.INSUFFICIENT_DEVICE_DOMAINS, "the host ran out of domain tags")
            return self._free_tags.popleft()

    def free_tag(self, tag: int) -> None:
        """Back of the FIFO: a tag is reused only after every other free one."""
        with self.lock:
            self._free_tags.append(tag)

    def context_for(self, part: Partition | None, dom: Domain | None) -> ContextEntry:
        """The context entry a device in ``dom`` gets (blocked when none)."""
        if part is None or dom is None or not dom.configured or dom.blocked:
            return ContextEntry.blocked()
        s2_root = self.tables.root_of(part.stage2)
        if dom.table is not None:  # baseline: IOVA -> HPA in the domain's own table
            return ContextEntry.s2_only(dom.tag, self.tables.root_of(dom.table), stage2.S2_LEVELS)
        if not dom.translation_enabled:
            return ContextEntry.identity(dom.tag, s2_root, stage2.S2_LEVELS)
        fs_levels = 5 if dom.five_level else 4
        return ContextEntry.nested(dom.tag, Gpa(dom.root), fs_levels, s2_root, stage2.S2_LEVELS)

    def set_device_domain(self, part: Partition, dev: Device, dom: Domain | None) -> None:
        """Point ``dev`` at ``dom`` (None = blocked) in one step: the new context
        is written over the old one (no window where DMA uses neither) and the
        unit confirms it dropped the old context and the old domain's
        translations before the records change. TIME_OUT: the old context is
        back and nothing changed."""
        old = part.domains.get(dev.domain_id) if dev.domain_id else None
        if dev.sync is not Sync.LOST:  # a lost device's slot stays blocked and quarantined: bookkeeping only
            saved = self.tables.read_context_raw(dev.slot)
            self.tables.write_context(dev.slot, self.context_for(part, dom))
            items: list[QueueItem] = [Invalidation.context(dev.slot)]
            if old is not None:
                items.append(Invalidation.domain(old.tag))
            try:
                self.units.tell(dev, items)
            except HvError:
                self.tables.write_context_raw(dev.slot, saved)
                raise
        if old is not None:
            old.devices.discard(dev.logical_device_id)
            if old is not dom:
                dev.tags.discard(old.tag)
        dev.domain_id = dom.domain_id if dom is not None else 0
        if dom is not None:
            dom.devices.add(dev.logical_device_id)
            dev.tags.add(dom.tag)

    def reconfigure_domain(self, part: Partition, dom: Domain, apply: Callable[[Domain], object]) -> None:
        """Change ``dom``'s settings with ``apply(dom)`` and give its devices the
        new context, every unit holding its tag confirming; TIME_OUT: the old
        settings and contexts are back."""
        saved_fields = {k: getattr(dom, k) for k in ("configured", "translation_enabled", "blocked",
                                                    "five_level", "root")}
        attached = [d for d in self.devices_of(part) if d.logical_device_id in dom.devices]
        saved_ctx = [(d, self.tables.read_context_raw(d.slot)) for d in attached]
        apply(dom)
        for d in attached:
            if d.sync is not Sync.LOST:
                self.tables.write_context(d.slot, self.context_for(part, dom))
        units = {d.logical_device_id: d for d in [*attached, *self.units_holding(part, dom.tag)]}
        try:
            for logical, d in sorted(units.items()):
                items: list[QueueItem] = [Invalidation.domain(dom.tag)]
                if logical in dom.devices:
                    items.insert(0, Invalidation.context(d.slot))
                self.units.tell(d, items)
        except HvError:
            for k, v in saved_fields.items():
                setattr(dom, k, v)
            for d, raw in saved_ctx:
                self.tables.write_context_raw(d.slot, raw)
            raise

    def delete_domain(self, part: Partition, dom: Domain) -> None:
        """Flush ``dom``'s tag everywhere it may be cached, then free it (its
        devices must be detached). TIME_OUT: the domain stays."""
        self.units.tell_all(self.units_holding(part, dom.tag), [Invalidation.domain(dom.tag)])
        self._free_domain(part, dom)

    def _free_domain(self, part: Partition, dom: Domain) -> None:
        """Free a domain no unit can cache any more (its tag was flushed, or
        every unit that held it was fenced)."""
        for d in self.devices_of(part):
            d.tags.discard(dom.tag)
        if dom.table is not None:
            self.tables.free_table(dom.table)
        del part.domains[dom.domain_id]
        self.free_tag(dom.tag)

    def flush_domain(self, part: Partition, dom: Domain) -> None:
        """Domain-wide flush on every unit that may cache ``dom``'s tag."""
        self.units.tell_all(self.units_holding(part, dom.tag), [Invalidation.domain(dom.tag)])
        self.counters.count("flushes_domain")

    def flush_pages(self, part: Partition, dom: Domain, blocks: Sequence[tuple[Iova, int]]) -> None:
        """Page-selective flushes of ``(address, mask)`` blocks: one batch and
        one wait per unit."""
        items: list[QueueItem] = [Invalidation.pages(dom.tag, a, m) for a, m in blocks]
        self.units.tell_all(self.units_holding(part, dom.tag), items)
        self.counters.count("flushes_pages")

    def units_holding(self, part: Partition, tag: int) -> list[Device]:
        """The partition's devices whose units may cache entries of ``tag``
        (after an ownership fence a device holds none of its old owner's)."""
        return [d for d in self.devices_of(part) if tag in d.tags]

