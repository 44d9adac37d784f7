"""Hostile descriptors, system level: a benign guest stage 1 maps some buffers
read/write, some read-only (by stage 1, or by stage 2 under a writable stage-1
leaf), some over the MMIO hole, and leaves the rest unmapped; the guest then
submits anything -- every opcode (and undefined ones), random flags including
reserved bits, sizes past the maximum, addresses in and out of the mapped
ranges, batch lists that point at themselves, at other lists, or misaligned.

Each descriptor completes with a defined DSA status (in its record, or in
SWERR when no record can be written: CRA_ALIGN / CRA_XLAT), and no byte
changes outside the buffers mapped writable and the completion records: not
in the rest of partition A, not in partition B, not in bank 0.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from pviommu.abi.dsa import STATUS_MASK, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.addr import Gpa
from tests.kit import robustkit as rk
from tests.kit.descstrategies import draw_descriptor
from tests.kit.dsarig import (
    COMP_GPA,
    COMP_IOVA,
    DATA_GPA,
    DATA_IOVA,
    DATA_SIZE,
    HOLE_IOVA,
    LIST_GPA,
    LIST_IOVA,
    PAGE,
    RO1_IOVA,
    S2RO_IOVA,
    UNMAPPED_GPA,
    DsaRig,
    changed_pages,
    check_device_statuses,
    check_isolation,
)

U64 = (1 << 64) - 1
#: the only GPA ranges of A a descriptor may change (mapped writable by both stages)
WRITABLE = [(DATA_GPA, DATA_SIZE), (COMP_GPA, PAGE), (LIST_GPA, 2 * PAGE)]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DsaRig]:
    r = DsaRig(Path(tmp_path_factory.mktemp("descriptors")), large=False)
    yield r
    r.close()


def in_writable(gpa: int) -> bool:
    return any(lo <= gpa < lo + n for lo, n in WRITABLE)


ADDRS = st.one_of(
    st.builds(lambda base, off: base + off,
              st.sampled_from([DATA_IOVA, RO1_IOVA, COMP_IOVA, LIST_IOVA, S2RO_IOVA, HOLE_IOVA]),
              st.integers(0, 0x1_0000)),
    st.integers(DATA_IOVA, DATA_IOVA + DATA_SIZE).map(lambda a: a & ~63),
    st.sampled_from([0, DATA_IOVA + DATA_SIZE - 8, DATA_IOVA + DATA_SIZE, RO1_IOVA - 8,
                     COMP_IOVA + PAGE - 16, LIST_IOVA + 2 * PAGE - 64, DATA_GPA, UNMAPPED_GPA,
                     1 << 47, U64 - 7, 0xFEE0_0000]),
    st.integers(0, U64),
)
SIZES = st.one_of(st.integers(0, 3 * PAGE), st.sampled_from([8, 16, 512, 520, 4096, 4104, 1 << 21, (1 << 21) + 1]),
                  st.integers(0, 2**32 - 1))
OPCODES = st.one_of(st.sampled_from([int(o) for o in Opcode]), st.sampled_from([int(o) for o in Opcode]),
                    st.integers(0, 255))
FLAGS = st.one_of(st.integers(0, 0xFFFFFF), *[st.sampled_from([0, 0, 0, int(DescFlags.BOF), int(DescFlags.CR),
                                                               int(DescFlags.FENCE), int(DescFlags.RCI), 0x10000,
                                                               0x20000, 0xFF0000])] * 3)


@st.composite
def descriptors(draw: st.DrawFn, comp: int) -> Descriptor:
    return Descriptor(
        opcode=draw(OPCODES), flags=draw(FLAGS) | int(DescFlags.CRAV | DescFlags.RCR),
        pasid=draw(st.sampled_from([0, 0, 0, 1, 0xFFFFF])), priv=draw(st.sampled_from([0, 0, 0, 1])),
        rsvd=draw(st.sampled_from([0] * 8 + [1, 0x7FF])),
        completion_addr=draw(st.sampled_from([comp] * 14 + [comp + 8, 0, RO1_IOVA, S2RO_IOVA, HOLE_IOVA,
                                                            UNMAPPED_GPA, U64 & ~31])),
        src_addr=draw(ADDRS), dst_addr=draw(ADDRS), xfer_size=draw(SIZES),
        int_handle=draw(st.sampled_from([0, 1, 8, 9, 0xFFFF])), rsvd1=draw(st.sampled_from([0] * 8 + [1])),
        op_specific=draw(st.just(bytes(24)) | st.just(bytes(24)) | st.binary(min_size=24, max_size=24)
                         | st.builds(lambda a, w: struct.pack("<QIIQ", a, w, 0, 0), ADDRS, st.integers(0, 2**32 - 1))),
    )


def note(what: str) -> None:
    if currently_in_test_context():
        event(what)


def run_and_check(rig: DsaRig, *descs: Descriptor) -> None:
    """Run ``descs`` one after the other, then check the banks once and each
    descriptor's outcome (its record, or the SWERR entries it raised)."""
    before = rig.banks()
    rig.recorder.take()
    outcomes = []
    for desc in descs:
        swerr = len(rig.swerrs)
        rig.run(desc)
        outcomes.append((desc, rig.read_record(desc.completion_addr), rig.swerrs[swerr:]))
    calls = rig.recorder.take()
    check_isolation(rig, before, calls)
    check_device_statuses(rig.device)
    _, after, _ = rig.banks()
    for page in changed_pages(before[1], after):
        assert in_writable(page), f"descriptors {descs} changed A's page {page:#x}, not a writable-mapped buffer"
    for desc, rec, new in outcomes:
        if rec is not None and rec.status:
            assert rec.code in DsaStatus._value2member_map_, rec
            note(f"status {DsaStatus(rec.code).name}")
        else:  # no record could be written: SWERR says why, with a defined status
            assert new, f"descriptor {desc} left neither a record nor a software error"
            for err in new:
                assert err.status & STATUS_MASK in DsaStatus._value2member_map_, err
                note(f"swerr {DsaStatus(err.status & STATUS_MASK).name}")
        rk.count("descriptor_fuzz_descriptors")


@rk.robust_settings(150)
@given(data=st.data())
def test_random_descriptor_completes_defined_and_writes_only_writable_buffers(rig: DsaRig,
                                                                               data: st.DataObject) -> None:
    rig.restore()
    if data.draw(st.booleans(), label="well-formed"):  # real DMA through in/out-of-range addresses
        desc = draw_descriptor(data, rig, ADDRS)
        run_and_check(rig, desc)
        return
    desc = data.draw(descriptors(rig.next_comp()))
    if desc.opcode == Opcode.BATCH and data.draw(st.booleans()):
        # a real list in the list pages, entries drawn the same way
        n = data.draw(st.integers(0, 8))
        raw = b"".join(data.draw(descriptors(rig.next_comp())).pack() for _ in range(n))
        rig.ram.write(Gpa(LIST_GPA), raw)
        desc = desc.with_(src_addr=LIST_IOVA + data.draw(st.sampled_from([0, 0, 8, 32])), xfer_size=n)
    run_and_check(rig, desc)


@rk.robust_settings(40)
@given(n=st.integers(0, 40), at=st.sampled_from([0, 64, 8, PAGE - 64]), fence=st.booleans())
def test_batch_lists_pointing_at_themselves_or_each_other_end_with_defined_status(
        rig: DsaRig, n: int, at: int, fence: bool) -> None:
    """List 1 holds BATCH descriptors pointing at list 1 itself and at list 2;
    list 2 points back at list 1. Nested batches are refused (BAD_OPCODE), so
    nothing recurses; each record is defined; only records and lists change."""
    rig.restore()
    l1, l2 = LIST_IOVA + at, LIST_IOVA + PAGE
    flags = int(DescFlags.CRAV | DescFlags.RCR | (DescFlags.FENCE if fence else 0))

    def batch(target: int, count: int) -> Descriptor:
        return Descriptor(opcode=Opcode.BATCH, flags=flags, completion_addr=rig.next_comp(), src_addr=target,
                          xfer_size=count)

    list1 = b"".join(batch(l1 if i % 2 else l2, n).pack() for i in range(min(n, 32)))
    rig.ram.write(Gpa(LIST_GPA + at), list1[: 2 * PAGE - at])
    rig.ram.write(Gpa(LIST_GPA + PAGE), b"".join(batch(l1, n).pack() for _ in range(4)))
    top = batch(l1, n).with_(flags=int(DescFlags.CRAV | DescFlags.RCR))
    run_and_check(rig, top)
    rec = rig.record_at(top.completion_addr)
    assert rec is not None and rec.code in (DsaStatus.SUCCESS, DsaStatus.BATCH_FAIL, DsaStatus.DESC_CNT_ERANGE,
                                            DsaStatus.DESCLIST_ALIGN, DsaStatus.BATCH_PAGE_FAULT), rec
    rk.count("descriptor_fuzz_self_batches")


def test_every_opcode_byte_completes_with_a_defined_status(rig: DsaRig) -> None:
    for first in range(0, 256, 32):
        rig.restore()
        run_and_check(rig, *(Descriptor(opcode=op, flags=int(DescFlags.CRAV | DescFlags.RCR),
                                        completion_addr=rig.next_comp(), src_addr=DATA_IOVA,
                                        dst_addr=DATA_IOVA + 0x8000, xfer_size=64)
                             for op in range(first, first + 32)))
    rig.known_good_memmove()
