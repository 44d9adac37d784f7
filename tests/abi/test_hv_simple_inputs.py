"""Pins the byte layouts of the building blocks (device domain, device ids, settings) and the simple-call inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pviommu.abi.hv import (
    AttachDeviceDomainInput,
    ConfigureDeviceDomainInput,
    CreateDeviceDomainInput,
    DeleteDeviceDomainInput,
    DetachDeviceDomainInput,
    DeviceDomain,
    DeviceDomainId,
    DeviceDomainSettings,
    FlushDeviceDomainInput,
    FlushDeviceDomainListHeader,
    GetIommuCapabilitiesInput,
    HvCallCode,
    HvDeviceId,
    HvDeviceType,
    HvInputVtl,
    HypercallInput,
    MapDeviceGpaPagesHeader,
    PciDeviceId,
    build_logical_device_id,
    decode_input,
)
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa, Iova
from tests.kit.hvlayouts import DD, DD_HEX, SELF, SIMPLE_CODES, Refused, hand_input
from tests.kit.hvstrategies import device_domains, settings


def test_device_domain_is_partition_vtl_padding_then_domain_id() -> None:
    assert DD.pack() == bytes.fromhex(DD_HEX)
    vtl = DeviceDomain(0x11, DeviceDomainId(type=2, id=0xFFFFFFFE), HvInputVtl(target_vtl=2, use_target_vtl=True))
    assert vtl.pack() == bytes.fromhex("1100000000000000" + "12" + "00" * 7 + "02000000" + "feffffff")
    assert DeviceDomain.unpack(bytes.fromhex(DD_HEX)) == DD


def test_create_flags_are_a_u32_at_offset_24() -> None:
    req = CreateDeviceDomainInput(DD, forward_progress_required=True, inherit_owning_vtl=True)
    assert req.pack() == bytes.fromhex(DD_HEX + "03000000")
    only_inherit = bytes.fromhex(DD_HEX + "02000000")
    assert CreateDeviceDomainInput.unpack(only_inherit) == CreateDeviceDomainInput(DD, inherit_owning_vtl=True)


def test_delete_is_the_device_domain_alone() -> None:
    assert DeleteDeviceDomainInput(DD).pack() == bytes.fromhex(DD_HEX)


def test_attach_puts_the_device_id_at_offset_24() -> None:
    req = AttachDeviceDomainInput(DD, HvDeviceId.logical(0xAABBCC03))
    assert req.pack() == bytes.fromhex(DD_HEX + "03ccbbaa00000000")


def test_detach_is_partition_id_then_device_id() -> None:
    req = DetachDeviceDomainInput(SELF, HvDeviceId(HvDeviceType.PCI, 0x0100))
    #                                        rid 0x0100, type PCI in bits 62-63 -> top byte 0x40
    assert req.pack() == bytes.fromhex("ffffffffffffffff" + "0001000000000040")


def test_configure_puts_settings_flags_at_24_and_root_at_32() -> None:
    settings = DeviceDomainSettings(
        translation_enabled=True, blocked=False, first_stage_paging_mode=1, page_table_root=Gpa(0x12345000)
    )
    expected = bytes.fromhex(DD_HEX + "0500000000000000" + "0050341200000000")
    assert ConfigureDeviceDomainInput(DD, settings).pack() == expected
    blocked = bytes.fromhex(DD_HEX + "0300000000000000" + "0000000000000000")
    assert ConfigureDeviceDomainInput.unpack(blocked).settings == DeviceDomainSettings(True, True, 0, Gpa(0))


def test_flush_is_device_domain_then_zero_flags_and_reserved() -> None:
    assert FlushDeviceDomainInput(DD).pack() == bytes.fromhex(DD_HEX + "00000000" + "00000000")


def test_get_iommu_capabilities_input_is_partition_then_reserved() -> None:
    assert GetIommuCapabilitiesInput().pack() == bytes.fromhex("ffffffffffffffff" + "00" * 8)


def test_logical_device_id_takes_guid_bytes_5_4_7_6_and_the_pci_function() -> None:
    guid = bytes(range(0x10, 0x20))  # b[4]=0x14, b[5]=0x15, b[6]=0x16, b[7]=0x17
    # (b[5]<<24)|(b[4]<<16)|(b[7]<<8)|(b[6]&0xf8)|func  with func 5: 0x16 & 0xf8 = 0x10, | 5 = 0x15
    assert build_logical_device_id(guid, 5) == 0x1514_1715
    assert build_logical_device_id(bytes(6) + b"\xff" + bytes(9), 7) == 0xFF


def test_logical_device_id_is_a_logical_hv_device_id() -> None:
    raw = build_logical_device_id(bytes(range(16)), 3)
    dev = HvDeviceId.from_u64(raw)
    assert dev.type is HvDeviceType.LOGICAL
    assert dev.to_u64() == raw


def test_logical_device_id_refuses_a_short_guid_and_a_function_above_7() -> None:
    with pytest.raises(ValueError):
        build_logical_device_id(bytes(15), 0)
    with pytest.raises(ValueError):
        build_logical_device_id(bytes(16), 8)


def test_device_id_type_lives_in_bits_62_and_63() -> None:
    assert HvDeviceId(HvDeviceType.ACPI, 1).to_u64() == 0xC000_0000_0000_0001
    assert HvDeviceId.from_u64(0x8000_0000_0000_0002) == HvDeviceId(HvDeviceType.IOAPIC, 2)


def test_pci_device_id_bit_positions() -> None:
    pci = PciDeviceId(rid=0x0108, segment=0x0002, shadow_bus_range=0x0304, phantom=2, source_shadow=True)
    assert pci.to_device_id().to_u64() == (1 << 62) | (1 << 50) | (2 << 48) | (0x0304 << 32) | (2 << 16) | 0x0108
    assert PciDeviceId.from_device_id(pci.to_device_id()) == pci


def test_pci_device_id_with_reserved_bits_is_an_invalid_parameter() -> None:
    with Refused(HvStatus.INVALID_PARAMETER):
        PciDeviceId.from_device_id(HvDeviceId(HvDeviceType.PCI, 1 << 51))


@given(st.integers(0, (1 << 64) - 1))
def test_every_u64_device_id_round_trips(raw: int) -> None:
    assert HvDeviceId.from_u64(raw).to_u64() == raw


@given(device_domains)
def test_device_domain_round_trips(dd: DeviceDomain) -> None:
    assert DeviceDomain.unpack(dd.pack()) == dd


@given(settings)
def test_settings_round_trip(s: DeviceDomainSettings) -> None:
    assert DeviceDomainSettings.unpack(s.pack()) == s


@pytest.mark.parametrize("code", SIMPLE_CODES, ids=lambda c: c.name)
def test_simple_call_accepts_padding_to_8_bytes_and_refuses_more(code: HvCallCode) -> None:
    _, data = hand_input(code)
    padded = -(-len(data) // 8) * 8
    decode_input(code, 0, 0, bytes(data) + bytes(padded - len(data)))
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 0, 0, bytes(data) + bytes(padded - len(data) + 1))


def test_create_trailing_padding_is_ignored_unless_strict() -> None:
    _, data = hand_input(HvCallCode.CREATE_DEVICE_DOMAIN)
    junk = bytes(data) + b"\xaa\xbb\xcc\xdd"
    assert decode_input(HvCallCode.CREATE_DEVICE_DOMAIN, 0, 0, junk) == decode_input(
        HvCallCode.CREATE_DEVICE_DOMAIN, 0, 0, bytes(data)
    )
    with Refused(HvStatus.INVALID_PARAMETER):
        decode_input(HvCallCode.CREATE_DEVICE_DOMAIN, 0, 0, junk, strict_padding=True)


@pytest.mark.parametrize("code", SIMPLE_CODES, ids=lambda c: c.name)
def test_rep_count_or_rep_start_on_a_simple_call_is_invalid_hypercall_input(code: HvCallCode) -> None:
    _, data = hand_input(code)
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 1, 0, bytes(data))
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 0, 1, bytes(data))


def test_unpack_of_a_single_structure_refuses_a_wrong_length() -> None:
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        DeviceDomain.unpack(bytes(23))
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        DeviceDomain.unpack(bytes(25))


def test_building_out_of_range_fields_is_a_value_error_not_a_status() -> None:
    with pytest.raises(ValueError):
        DeviceDomainId(type=16, id=0)
    with pytest.raises(ValueError):
        HvInputVtl(target_vtl=16)
    with pytest.raises(ValueError):
        HypercallInput(0x1_0000)


def test_the_flags_words_are_checked_by_the_constructors_with_the_wire_status() -> None:
    """Undefined flag bits and a too-wide owner VTL are INVALID_PARAMETER however the input is built."""
    with Refused(HvStatus.INVALID_PARAMETER):
        CreateDeviceDomainInput.from_flags(DD, 4)
    with Refused(HvStatus.INVALID_PARAMETER):
        FlushDeviceDomainInput.from_flags(DD, 1)
    with Refused(HvStatus.INVALID_PARAMETER):
        FlushDeviceDomainListHeader.from_flags(DD, 2)
    with Refused(HvStatus.INVALID_PARAMETER):
        MapDeviceGpaPagesHeader(DD, 4, Iova(0))
    with Refused(HvStatus.INVALID_PARAMETER):
        HvInputVtl.from_u8(0x100)
    assert CreateDeviceDomainInput.from_flags(DD, 3).flags == 3
    assert FlushDeviceDomainListHeader.from_flags(DD, 1).flags == 1
    assert FlushDeviceDomainInput.from_flags(DD, 0) == FlushDeviceDomainInput(DD)
