"""Sizes, bank folders on tmpfs, capacity checks, exit codes, hex output: the
small core pieces the client, the CLI and the services share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pviommu.abi.hv_status import HvStatus
from pviommu.client.fmt import hex_repr, message_to_json
from pviommu.client.types import DeviceInfo, Direction
from pviommu.errors import HvError
from pviommu.mem import placement
from pviommu.rpc.bind import bind_problem, split_address
from pviommu.units import GiB, KiB, MiB, TiB, format_size, parse_size
from pviommu.v1 import admin_pb2, guest_pb2


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("0x4000", 0x4000), ("64K", 64 * KiB),
                                             ("256M", 256 * MiB), ("256MiB", 256 * MiB), ("1g", GiB),
                                             ("1.5G", 3 * GiB // 2), ("2T", 2 * TiB), (" 8 KB ", 8 * KiB)])
def test_parse_size_reads_the_forms_people_type(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12Q", "0x10K", "1.3K", "-4K", "four"])
def test_parse_size_refuses_anything_else_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|bytes|unit"):
        parse_size(text)


def test_format_size_is_exact_for_round_sizes_and_decimal_otherwise() -> None:
    assert [format_size(n) for n in (512, 64 * KiB, 256 * MiB, 3 * GiB // 2, 2 * TiB)] == [
        "512 B", "64 KiB", "256 MiB", "1.5 GiB", "2 TiB"]


MOUNTINFO = """\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
26 22 0:23 / /dev/shm rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
40 22 0:40 / /srv/my\\040banks rw - tmpfs tmpfs rw,size=1g
41 22 0:41 / /srv/my\\040banks/disk rw - xfs /dev/vdb rw
"""


@pytest.mark.parametrize(("path", "mount", "kind"), [("/dev/shm/x", "/dev/shm", "tmpfs"), ("/tmp/y", "/", "ext4"),
                                                     ("/srv/my banks/b", "/srv/my banks", "tmpfs"),
                                                     ("/srv/my banks/disk/c", "/srv/my banks/disk", "xfs"),
                                                     ("/dev/shmx", "/", "ext4")])
def test_filesystem_of_finds_the_innermost_mount(path: str, mount: str, kind: str) -> None:
    fs = placement.filesystem_of(path, MOUNTINFO)
    assert (fs.mount_point, fs.fs_type) == (mount, kind)
    assert fs.memory_backed == (kind == "tmpfs")


@pytest.mark.skipif(not placement.SHM_ROOT.is_dir(), reason="no /dev/shm here")
def test_bank_folders_go_to_dev_shm_when_it_is_a_tmpfs_with_room() -> None:
    folder = placement.make_bank_folder("pviommu-test-", need_bytes=MiB)
    try:
        if not placement.filesystem_of(placement.SHM_ROOT).memory_backed:
            pytest.skip("/dev/shm is not a tmpfs here")
        assert folder.path.parent == placement.SHM_ROOT and folder.fs.memory_backed and folder.note == ""
        assert (folder.path / placement.OWNER_FILE).read_text() == str(os.getpid())
    finally:
        subprocess.run(["rm", "-rf", str(folder.path)], check=True)


def test_a_dev_shm_too_small_for_the_banks_is_said_and_the_banks_go_elsewhere() -> None:
    folder = placement.make_bank_folder("pviommu-test-", need_bytes=1 << 60)
    try:
        assert folder.path.parent != placement.SHM_ROOT
        assert "too small" in folder.note or "not" in folder.note
        assert "1024 PiB" in folder.note or "needed" in folder.note or "not available" in folder.note
    finally:
        subprocess.run(["rm", "-rf", str(folder.path)], check=True)


def test_stale_bank_folders_of_dead_owners_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("pviommu-dead", dead.pid), ("pviommu-live", os.getpid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / placement.OWNER_FILE).write_text(str(pid))
        (tmp_path / name / "bank-00000.mem").write_bytes(b"x")
    (tmp_path / "pviommu-foreign").mkdir()  # no owner file: not ours to judge
    removed = placement.sweep_stale(tmp_path)
    assert removed == [tmp_path / "pviommu-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pviommu-foreign", "pviommu-live"]


def test_capacity_check_refuses_on_a_tmpfs_and_only_warns_on_a_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(placement.OVERCOMMIT_ENV, raising=False)
    disk = placement.filesystem_of(tmp_path)
    huge = disk.free_bytes + GiB
    if disk.memory_backed:
        pytest.skip("the temporary folder is a tmpfs here")
    assert placement.check_capacity(tmp_path, MiB) is None
    assert "does not fit" in (placement.check_capacity(tmp_path, huge) or "")
    if not placement.SHM_ROOT.is_dir() or not placement.filesystem_of(placement.SHM_ROOT).memory_backed:
        pytest.skip("no tmpfs /dev/shm here")
    shm = placement.filesystem_of(placement.SHM_ROOT)
    with pytest.raises(HvError) as refused:
        placement.check_capacity(placement.SHM_ROOT, shm.free_bytes + GiB)
    assert refused.value.hv_status == HvStatus.INSUFFICIENT_MEMORY and "SIGBUS" in str(refused.value)
    # what existing banks have not touched yet is still owed to them
    bank = tmp_path / "bank"
    bank.write_bytes(b"")
    os.truncate(bank, shm.free_bytes // 2 + MiB)
    with pytest.raises(HvError):
        placement.check_capacity(placement.SHM_ROOT, shm.free_bytes // 2, [(bank, shm.free_bytes // 2 + MiB)])
    assert placement.check_capacity(placement.SHM_ROOT, shm.free_bytes // 2, []) is None
    monkeypatch.setenv(placement.OVERCOMMIT_ENV, "1")
    assert "does not fit" in (placement.check_capacity(placement.SHM_ROOT, shm.free_bytes + GiB) or "")


def test_bind_problem_names_a_port_in_use_and_accepts_a_free_one() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "already in use" in (bind_problem(f"127.0.0.1:{port}") or "")
    assert bind_problem("127.0.0.1:0") is None
    assert "not host:port" in (bind_problem("localhost") or "")
    assert split_address("[::1]:50051") == ("::1", 50051)


def test_ids_addresses_and_bitmaps_print_in_hex_in_reprs_and_json() -> None:
    dev = DeviceInfo(0x2A43C750, "dsa0", "127.0.0.1:1", 3, 1, 7, True, 0x8086, 0x0B25)
    text = repr(dev)
    assert "logical_device_id=0x2a43c750" in text and "partition_id=0x1" in text and "slot=3" in text
    assert str(0x2A43C750) not in text
    info = message_to_json(guest_pb2.IommuInfo(present=True, iommu_cap=5, pgsize_bitmap=0x40201000, iova_width=48,
                                               partition_id=1))
    assert info["iommuCap"] == "0x5" and info["pgsizeBitmap"] == "0x40201000" and info["partitionId"] == "0x1"
    assert info["iovaWidth"] == 48  # a width is a count, not an address
    dump = message_to_json(admin_pb2.TableDump(ranges=[admin_pb2.MappedRange(va=0x7FFF_FFFF_F000, oa=0x10_0000,
                                                                             size=4096)]), proto_names=True)
    assert dump["ranges"][0] == {"va": "0x7ffffffff000", "oa": "0x100000", "size": "4096", "perm": ""}
    assert hex_repr(dev, ("slot",)).startswith("DeviceInfo(")


def test_direction_names_are_forgiving_and_wrong_ones_are_named() -> None:
    assert Direction.parse("to-device") is Direction.TO_DEVICE and Direction.parse(2) is Direction.FROM_DEVICE
    with pytest.raises(ValueError, match="BIDIRECTIONAL, TO_DEVICE, FROM_DEVICE"):
        Direction.parse("sideways")


def test_a_revision_is_forwarded_to_the_hypervisor_and_the_guests_only_when_given() -> None:
    from pviommu.client.local import LocalHost

    for revision, want in (("v1", ["--revision", "v1"]), (None, [])):
        host = LocalHost(1, 1, 64 * MiB, revision=revision, guest_args=["--lazy"])
        try:
            assert host.hypervisor_args[: len(want)] == want and ("--revision" in host.hypervisor_args) == bool(want)
            assert host.guest_args == [*want, "--lazy"] and "--revision" not in host.device_args
        finally:
            host.stop()
        assert not host.memory_dir.exists() and not host.workdir.exists()
