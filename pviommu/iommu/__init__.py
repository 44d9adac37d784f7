"""The IOMMU unit a device emulator embeds: context entries, IOTLB, the nested
(two-dimensional) walk and fault records. ``IommuUnit`` in ``unit`` is the
entry point; the hypervisor writes ``context`` entries and calls the unit's
invalidation methods."""
