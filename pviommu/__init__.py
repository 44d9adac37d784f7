"""pviommu: the shared core of the Hyper-V para-virtualized IOMMU twin.

Floor 1 of the architecture (docs/design.md): memory banks, page-table formats,
the IOMMU unit, ABI layouts and status codes, gRPC plumbing and logging.
It imports no service package; every service imports it.
"""

__version__ = "0.1.0"
