"""The page-table formats, and the configurations tests run every property over."""

from __future__ import annotations

from collections.abc import Callable

from pviommu.pt.common import PtFormat
from pviommu.pt.fmt.vtd_ss import VtdSsFormat
from pviommu.pt.fmt.x86_64 import X86_64Format

#: Every format x configuration, by a short id (generic_pt's *_kunit_fmt_cfgs).
FORMAT_CONFIGS: dict[str, Callable[[], PtFormat]] = {
    "x86_64-4lvl": lambda: X86_64Format(levels=4),
    "x86_64-5lvl": lambda: X86_64Format(levels=5),
    "vtd_ss-3lvl": lambda: VtdSsFormat(levels=3),
    "vtd_ss-4lvl": lambda: VtdSsFormat(levels=4),
    "vtd_ss-5lvl": lambda: VtdSsFormat(levels=5),
}

__all__ = ["FORMAT_CONFIGS", "VtdSsFormat", "X86_64Format"]
