from __future__ import annotations

from pathlib import Path

import pytest

from pviommu.addr import SZ_2M, SZ_4K, Gpa
from pviommu.errors import OutOfFrames
from pviommu.mem.bank import GuestRam, HostMemory
from pviommu.mem.frames import guest_frames, host_frames


@pytest.fixture
def ram(tmp_path: Path) -> GuestRam:
    host = HostMemory(tmp_path)
    return GuestRam(host.create_bank(1, 8 << 20))


def test_blocks_are_naturally_aligned_and_zeroed(ram: GuestRam) -> None:
    frames = guest_frames(ram, SZ_4K, (8 << 20) - SZ_4K)  # unaligned start for 2M blocks
    ram.write(Gpa(0x200000), b"\xff" * SZ_2M)
    block = frames.alloc_lg2(21)
    assert block % SZ_2M == 0
    assert ram.read(block, SZ_2M) == bytes(SZ_2M)
    page = frames.alloc()
    assert page % SZ_4K == 0 and frames.allocated_frames == 513


def test_free_coalesces_buddies_back_to_large_blocks(ram: GuestRam) -> None:
    frames = guest_frames(ram, 0, 4 << 20)
    pages = [frames.alloc() for _ in range(1024)]
    with pytest.raises(OutOfFrames):
        frames.alloc()
    for page in pages:
        frames.free(page)
    assert frames.allocated_frames == 0
    assert frames.alloc_lg2(21) in (0, SZ_2M)  # a 2 MiB block exists again


def test_double_free_is_refused(ram: GuestRam) -> None:
    frames = guest_frames(ram, 0, 1 << 20)
    page = frames.alloc()
    frames.free(page)
    with pytest.raises(ValueError):
        frames.free(page)


def test_host_frames_hand_out_hpas_inside_the_bank(tmp_path: Path) -> None:
    host = HostMemory(tmp_path)
    bank = host.create_bank(0, 1 << 20)
    frames = host_frames(bank, 0x4000, (1 << 20) - 0x4000)
    hpa = frames.alloc()
    assert bank.base + 0x4000 <= hpa < bank.base + bank.size
    assert frames.owns(hpa)
    frames.free(hpa)
    assert frames.allocated_frames == 0
