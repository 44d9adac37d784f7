"""``hv_device_id`` and the logical device id the pv-IOMMU names devices by."""

from __future__ import annotations

from dataclasses import dataclass

from pviommu.abi.hv._checks import _U16, _check_uint, _reserved
from pviommu.abi.hv.codes import HvDeviceType

# --------------------------------------------------------------------------------------------
# hv_device_id and the logical device id
# --------------------------------------------------------------------------------------------

_DEVICE_ID_TYPE_SHIFT = 62
_DEVICE_ID_ID_MASK = (1 << 62) - 1


@dataclass(frozen=True)
class HvDeviceId:
    """``union hv_device_id`` (u64): bits 0-61 type-specific id, bits 62-63 the type.

    Every u64 is a valid encoding (the 2-bit type has four defined values), so parsing is total.
    For LOGICAL the id is the logical device id (:func:`build_logical_device_id`); for PCI see
    :class:`PciDeviceId`.
    """

    type: HvDeviceType
    id: int

    def __post_init__(self) -> None:
        _check_uint("hv_device_id.id", self.id, 62)

    @classmethod
    def logical(cls, logical_id: int) -> HvDeviceId:
        return cls(HvDeviceType.LOGICAL, logical_id)

    def to_u64(self) -> int:
        return (int(self.type) << _DEVICE_ID_TYPE_SHIFT) | self.id

    @classmethod
    def from_u64(cls, raw: int) -> HvDeviceId:
        _check_uint("hv_device_id", raw, 64)
        return cls(HvDeviceType(raw >> _DEVICE_ID_TYPE_SHIFT), raw & _DEVICE_ID_ID_MASK)


_PCI_RSVD_MASK = ((1 << 11) - 1) << 51


@dataclass(frozen=True)
class PciDeviceId:
    """The PCI form of ``hv_device_id``: ``rid`` u16 (bits 0-15), ``segment`` u16 (16-31),
    ``shadow_bus_range`` u16 (32-47), ``phantom:2`` (48-49), ``source_shadow:1`` (50),
    ``rsvd:11`` (51-61), ``type:2`` (62-63) = PCI."""

    rid: int
    segment: int
    shadow_bus_range: int = 0
    phantom: int = 0
    source_shadow: bool = False

    def __post_init__(self) -> None:
        _check_uint("pci rid", self.rid, 16)
        _check_uint("pci segment", self.segment, 16)
        _check_uint("pci shadow_bus_range", self.shadow_bus_range, 16)
        _check_uint("pci phantom", self.phantom, 2)

    def to_device_id(self) -> HvDeviceId:
        raw = (
            self.rid
            | self.segment << 16
            | self.shadow_bus_range << 32
            | self.phantom << 48
            | int(self.source_shadow) << 50
        )
        return HvDeviceId(HvDeviceType.PCI, raw)

    @classmethod
    def from_device_id(cls, dev: HvDeviceId) -> PciDeviceId:
        """ValueError if ``dev`` is not of type PCI; INVALID_PARAMETER if ``rsvd`` is set."""
        if dev.type is not HvDeviceType.PCI:
            raise ValueError(f"hv_device_id of type {dev.type.name}, not PCI")
        _reserved("hv_device_id.pci.rsvd", dev.id, _PCI_RSVD_MASK)
        return cls(
            rid=dev.id & _U16,
            segment=(dev.id >> 16) & _U16,
            shadow_bus_range=(dev.id >> 32) & _U16,
            phantom=(dev.id >> 48) & 0x3,
            source_shadow=bool((dev.id >> 50) & 1),
        )


def logical_device_id_prefix(instance_guid_bytes: bytes) -> int:
    """``hv_build_logical_dev_id_prefix()`` (PATCH v1/v2): the GUID part of the logical id,
    ``(b[5] << 24) | (b[4] << 16) | (b[7] << 8) | (b[6] & 0xf8)``, where ``b`` is the vPCI bus's
    VMBus ``dev_instance`` GUID in memory order (16 bytes)."""
    b = instance_guid_bytes
    if len(b) != 16:
        raise ValueError(f"a GUID has 16 bytes, not {len(b)}")
    return (b[5] << 24) | (b[4] << 16) | (b[7] << 8) | (b[6] & 0xF8)


def build_logical_device_id(instance_guid_bytes: bytes, pci_func: int) -> int:
    """``hv_build_logical_dev_id(pdev)`` (RFC 1/5): the prefix ORed with ``PCI_FUNC(devfn)``.

    Only the function number comes from the PCI address (not domain, bus or slot). The value is
    used directly as an ``hv_device_id``: bits 62-63 are 0, i.e. ``HV_DEVICE_TYPE_LOGICAL``.
    """
    _check_uint("PCI function", pci_func, 3)
    return logical_device_id_prefix(instance_guid_bytes) | pci_func
