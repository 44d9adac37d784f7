"""Revisions of the Hyper-V guest pv-IOMMU series, as typed profiles (one home for what differs).

The hypervisor enforces a revision's semantics and the guest agent's driver behaves as that
revision's driver; both read the facts from here so the two sides cannot drift apart. Facts come
from shared/reference/hyperv-series-revisions.md (tables 1-4, cited per field) and
hyperv-guest-iommu.md; where the series is silent the choice is documented in docs/revisions.md
and, when two answers are plausible, made configurable on the hypervisor (``HypervisorConfig``).

    RFC  0/5 <20251209051128.76913-1-zhangyu1@linux.microsoft.com>   (Dec 2025)
    v1   0/4 <20260511162408.1180069-1-...>                           (May 2026)
    v2   0/4 <20260702160518.311234-1-...>                            (Jul 2026, the latest: the default)

Things no revision changes (codes, layouts, cap bits 0-6) stay in ``pviommu.abi.hv``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from pviommu.abi.hv import (
    HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT,
    HV_HYP_PAGE_SIZE,
    FlushDeviceDomainListHeader,
    FlushVa,
)
from pviommu.abi.hv_status import HvStatus


class Revision(StrEnum):
    """A posted revision of the series."""

    RFC = "rfc"
    V1 = "v1"
    V2 = "v2"

    @classmethod
    def parse(cls, text: str | Revision) -> Revision:
        """``rfc``, ``v1`` or ``v2`` (any case); a clear ``ValueError`` otherwise."""
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise ValueError(f"unknown pv-IOMMU revision {text!r}: one of {', '.join(r.value for r in cls)}") from None


#: The newest posted revision; what both sides run unless told otherwise.
LATEST = Revision.V2
DEFAULT_REVISION = LATEST
REVISION_NAMES: tuple[str, ...] = tuple(r.value for r in Revision)


class PgsizePolicy(StrEnum):
    """What init does with ``pgsize_bitmap`` (table 3)."""

    #: RFC: taken as given (the domain later ANDs it with what the format can map).
    AS_GIVEN = "as-given"
    #: v1: masked to 4K/2M/1G; 4K if nothing is left.
    MASK_TO_FORMAT = "mask-to-format"
    #: v2: init fails (-ENODEV) if it is empty or has any bit outside 4K/2M/1G.
    REJECT_OUTSIDE_FORMAT = "reject-outside-format"


class FlushListStyle(StrEnum):
    """How ``iotlb_sync`` builds its page-selective flush (section 4)."""

    #: RFC: no page-selective flush; every sync is a domain flush (0xD0).
    NONE = "none"
    #: v1 4/4 ``hv_iommu_fill_iova_list``: exact aligned power-of-two blocks filling the page.
    EXACT_BLOCKS = "exact-blocks"
    #: v2 4/4: one block covering the range, rep count 1.
    COVERING_BLOCK = "covering-block"


class FlushFallback(StrEnum):
    """When the driver falls back from the list call to a domain flush."""

    NEVER = "never"
    #: v1: only when the blocks do not fit the input page; a failed list call is only logged.
    ON_OVERFLOW = "on-overflow"
    #: v2: on any failure of the list call (flags 0), WARN if that fails too.
    ON_ANY_FAILURE = "on-any-failure"


class StaticInit(StrEnum):
    """How the identity and blocking domain structs are initialised (table 2)."""

    MEMSET_THEN_SET = "memset-then-set"  # RFC
    SET_IN_C = "set-in-c"  # v1
    STATIC_INITIALIZERS = "static-initializers"  # v2: type, ops, owner only (no geometry, no pgsize)


class OutputPlacement(StrEnum):
    """Where a hypercall's output goes (section 5)."""

    #: RFC: a separate per-CPU output page (why RFC 4/5 existed).
    SEPARATE_PAGE = "separate-page"
    #: v1/v2: the input page right after the input (MK: input and output may share it).
    AFTER_INPUT = "after-input"


#: Entries of ``union hv_iommu_flush_va`` after the 32-byte header in one 4 KiB input page:
#: (4096 - 32) / 8 = 508 (v1 4/4 ``HV_IOMMU_MAX_FLUSH_VA_COUNT``).
FLUSH_LIST_CAPACITY = (HV_HYP_PAGE_SIZE - FlushDeviceDomainListHeader.SIZE) // FlushVa.SIZE
#: v1/v2 output offsets inside the input page (``input + 1``): capabilities after the 16-byte
#: input, the logical-device property after the 24-byte input.
CAPS_OUTPUT_OFFSET = 16
PROPERTY_OUTPUT_OFFSET = 24


@dataclass(frozen=True)
class DriverFacts:
    """What the guest driver of one revision does."""

    # -- init (table 3) --------------------------------------------------------------
    init_hook: str
    #: A failing GetIommuCapabilities is logged (v1/v2 pr_err) or silent (RFC); -ENODEV always.
    caps_failure_logged: bool
    pgsize_policy: PgsizePolicy
    #: RFC computes the aperture from the *reported* width, not the clamped one (its bug).
    aperture_from_reported_width: bool
    #: v1/v2 set generic_pt's top_level (4 if width > 48, else 3); the RFC leaves it unset.
    sets_top_level: bool
    #: CreateDeviceDomain flags: forward_progress_required = 1, inherit_owning_vtl = 0 (bit 0 set);
    #: the same in the RFC, v1 and v2 patch text (hv_create_device_domain), not in the reference tables.
    create_flags: int
    # -- static domains (table 2) ----------------------------------------------------
    static_init: StaticInit
    #: RFC/v1 give the identity and blocking domains the device's geometry and pgsize; v2
    #: static initializers set only type, ops and owner (JG: they need neither).
    static_domains_have_geometry: bool
    # -- attach / detach (table 1) ---------------------------------------------------
    #: RFC/v1: a device in another domain is DETACHed (0xC4), the old domain flushed, then ATTACHed.
    detach_before_attach: bool
    #: v2 removed the detach op: DETACH is never sent.
    sends_detach: bool
    #: Statuses an ATTACH may answer for the attach to count as done (SUCCESS only in all three;
    #: the later tree L also takes DEVICE_ALREADY_IN_DOMAIN).
    attach_accepts: frozenset[HvStatus]
    #: v2: the blocking domain has its own attach op that WARNs and *returns* the status.
    blocking_attach_own_op: bool
    # -- release_device (table 1) ----------------------------------------------------
    release_detaches: bool
    release_disables_ats: bool
    release_clears_dma_ops: bool
    #: RFC/v1 install dma_ops at probe (JG v1: "no set_dma_ops"); v2 does not.
    sets_dma_ops: bool
    # -- page-selective flush (section 4) --------------------------------------------
    flush_list: FlushListStyle
    flush_fallback: FlushFallback
    #: Elements one list call may carry (v1: the page; v2: always one).
    flush_list_capacity: int
    flush_list_flags: int
    #: v1 rounds the *inclusive* end up with PAGE_ALIGN (an end on a page boundary loses that
    #: page: the corner case v2 says it fixed).
    flush_list_page_align_inclusive_end: bool
    # -- hypercall page (section 5) --------------------------------------------------
    output_placement: OutputPlacement
    #: The logical-device property ``code`` is an enum in the RFC, a u32 in v1/v2 (4 bytes either way here).
    property_code_is_enum: bool


@dataclass(frozen=True)
class HypervisorFacts:
    """What a hypervisor answering that revision's driver does (defaults; see HypervisorConfig)."""

    #: v2: ATTACH of a device that is in another domain atomically replaces its translation
    #: (no window where DMA uses neither domain's tables; old IOTLB entries gone before return).
    #: RFC/v1: DEVICE_ALREADY_IN_DOMAIN ("detach it first").
    attach_replaces: bool
    #: v2: attaching a blocking domain cannot fail for the old domain's state (it replaces).
    blocking_attach_cannot_fail: bool


@dataclass(frozen=True)
class RevisionProfile:
    revision: Revision
    title: str
    message_id: str
    driver: DriverFacts
    hypervisor: HypervisorFacts


_SUCCESS_ONLY = frozenset({HvStatus.SUCCESS})
_FORMAT = HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT
_FORWARD_PROGRESS = 1 << 0  # hv_create_device_domain_flags.forward_progress_required

PROFILES: Mapping[Revision, RevisionProfile] = MappingProxyType({
    Revision.RFC: RevisionProfile(
        Revision.RFC, "RFC 0/5 (9 Dec 2025)", "<20251209051128.76913-1-zhangyu1@linux.microsoft.com>",
        DriverFacts(
            init_hook="device_initcall", caps_failure_logged=False, pgsize_policy=PgsizePolicy.AS_GIVEN,
            aperture_from_reported_width=True, sets_top_level=False, create_flags=_FORWARD_PROGRESS,
            static_init=StaticInit.MEMSET_THEN_SET, static_domains_have_geometry=True,
            detach_before_attach=True, sends_detach=True, attach_accepts=_SUCCESS_ONLY,
            blocking_attach_own_op=False,
            release_detaches=True, release_disables_ats=False, release_clears_dma_ops=True, sets_dma_ops=True,
            flush_list=FlushListStyle.NONE, flush_fallback=FlushFallback.NEVER, flush_list_capacity=0,
            flush_list_flags=0, flush_list_page_align_inclusive_end=False,
            output_placement=OutputPlacement.SEPARATE_PAGE, property_code_is_enum=True,
        ),
        HypervisorFacts(attach_replaces=False, blocking_attach_cannot_fail=False),
    ),
    Revision.V1: RevisionProfile(
        Revision.V1, "PATCH v1 0/4 (11 May 2026)", "<20260511162408.1180069-1-...>",
        DriverFacts(
            init_hook="x86_init.iommu.iommu_init", caps_failure_logged=True,
            pgsize_policy=PgsizePolicy.MASK_TO_FORMAT, aperture_from_reported_width=False, sets_top_level=True,
            create_flags=_FORWARD_PROGRESS,
            static_init=StaticInit.SET_IN_C, static_domains_have_geometry=True,
            detach_before_attach=True, sends_detach=True, attach_accepts=_SUCCESS_ONLY,
            blocking_attach_own_op=False,
            release_detaches=False, release_disables_ats=True, release_clears_dma_ops=True, sets_dma_ops=True,
            flush_list=FlushListStyle.EXACT_BLOCKS, flush_fallback=FlushFallback.ON_OVERFLOW,
            flush_list_capacity=FLUSH_LIST_CAPACITY, flush_list_flags=_FORMAT,
            flush_list_page_align_inclusive_end=True,
            output_placement=OutputPlacement.AFTER_INPUT, property_code_is_enum=False,
        ),
        HypervisorFacts(attach_replaces=False, blocking_attach_cannot_fail=False),
    ),
    Revision.V2: RevisionProfile(
        Revision.V2, "PATCH v2 0/4 (2 Jul 2026)", "<20260702160518.311234-1-...>",
        DriverFacts(
            init_hook="x86_init.iommu.iommu_init", caps_failure_logged=True,
            pgsize_policy=PgsizePolicy.REJECT_OUTSIDE_FORMAT, aperture_from_reported_width=False,
            sets_top_level=True, create_flags=_FORWARD_PROGRESS,
            static_init=StaticInit.STATIC_INITIALIZERS, static_domains_have_geometry=False,
            detach_before_attach=False, sends_detach=False, attach_accepts=_SUCCESS_ONLY,
            blocking_attach_own_op=True,
            release_detaches=False, release_disables_ats=True, release_clears_dma_ops=False, sets_dma_ops=False,
            flush_list=FlushListStyle.COVERING_BLOCK, flush_fallback=FlushFallback.ON_ANY_FAILURE,
            flush_list_capacity=1, flush_list_flags=_FORMAT, flush_list_page_align_inclusive_end=False,
            output_placement=OutputPlacement.AFTER_INPUT, property_code_is_enum=False,
        ),
        HypervisorFacts(attach_replaces=True, blocking_attach_cannot_fail=True),
    ),
})


def profile(revision: Revision | str) -> RevisionProfile:
    """The profile of ``revision`` (a ``Revision`` or its name)."""
    return PROFILES[Revision.parse(revision)]


class SameDomainAttach(StrEnum):
    """The hypervisor's answer to ATTACH of a device to the domain it is already in. The
    series is silent (every driver short-circuits it); L's 2db30347 dropped the check and
    accepts DEVICE_ALREADY_IN_DOMAIN, which suggests the real answer is that status."""

    ALREADY_IN_DOMAIN = "already-in-domain"
    SUCCESS = "success"


class BlockedWithoutTranslation(StrEnum):
    """ConfigureDeviceDomain with ``blocked`` set and ``translation_enabled`` clear. v2's
    comment and Yu's reply say the hypervisor refuses it (INVALID_PARAMETER); the series never
    says whether RFC/v1-era hypervisors did, so ``refuse`` is the default for every revision
    and ``accept`` (treated as blocked) is the alternative."""

    REFUSE = "refuse"
    ACCEPT = "accept"


__all__ = [
    "CAPS_OUTPUT_OFFSET", "DEFAULT_REVISION", "FLUSH_LIST_CAPACITY", "LATEST", "PROFILES", "PROPERTY_OUTPUT_OFFSET",
    "REVISION_NAMES", "BlockedWithoutTranslation", "DriverFacts", "FlushFallback", "FlushListStyle",
    "HypervisorFacts", "OutputPlacement", "PgsizePolicy", "Revision", "RevisionProfile", "SameDomainAttach",
    "StaticInit", "profile",
]
