"""Operations work in bounded steps, and the steps do not show.

Each operation translates and moves a bounded piece at a time (``ops.DATA_CHUNK``,
``ops.MOVE_CHUNK``, ``ops.PROBE_CHUNK``). These tests run the same descriptor
over the same partly mapped memory twice -- with tiny, unaligned steps and with
one step as large as the whole transfer (what the operations did before) -- and
require the same completion record (status, bytes completed, fault address,
CRC / DIF tags) and the same memory afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dma_device.dsa import ops
from dma_device.dsa.access import BlockOnFault
from dma_device.dsa.checks import Limits
from dma_device.dsa.ops import OpContext, execute
from pviommu.abi.dsa import (
    CRC_FLAG_BYPASS_CRC_INV_REF,
    CRC_FLAG_BYPASS_DATA_REF,
    CompletionRecord,
    Descriptor,
    DsaStatus,
    GenCap,
    Opcode,
    op_crc,
    op_dif_check,
    op_dif_ins,
    op_dif_updt,
    op_dualcast,
)
from pviommu.addr import PAGE_SIZE
from pviommu.mem.dma import DmaFault
from pviommu.units import MiB
from tests.kit.rig import Rig

SRC, DST, DST2, PROT = 1 * MiB, 4 * MiB, 7 * MiB, 10 * MiB  # regions of the rig's 16 MiB bank
SPAN = 2 * MiB + 64 * 1024  # how far from each region start holes may be drawn
BS, UNIT = 512, 520  # DIF block (flags 0) and block + tuple
REF, APP = 0xABBA, 0xFACE
TINY = {"DATA_CHUNK": 3 * 4096 + 520, "MOVE_CHUNK": 9000 + 3, "PROBE_CHUNK": 7 * 1024 + 5}
WHOLE = {"DATA_CHUNK": 1 << 40, "MOVE_CHUNK": 1 << 40, "PROBE_CHUNK": 1 << 40}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(Path(tmp_path_factory.mktemp("bounded")), enable=False)
    r.write(SRC, os.urandom(2 * MiB + 8192))
    # protected data for the DIF checks: DIF_INS of the source, on fully mapped memory
    rec = _run(r, Descriptor(opcode=Opcode.DIF_INS, src_addr=SRC, dst_addr=PROT, xfer_size=2 * MiB,
                             op_specific=op_dif_ins(0, 0, REF, 0, APP)), WHOLE)
    assert rec.status == DsaStatus.SUCCESS
    yield r
    r.close()


def _limits(rig: Rig) -> Limits:
    gc = GenCap()
    return Limits(gencap=gc, max_xfer=gc.max_xfer_size, max_batch=32, wq_bof=False, shared=False,
                  wq_priv=False, num_int_handles=9, opcap=rig.device.opcap)


def _run(rig: Rig, d: Descriptor, chunks: dict[str, int], faults: list[DmaFault] | None = None) -> CompletionRecord:
    saved = {k: getattr(ops, k) for k in chunks}
    for k, v in chunks.items():
        setattr(ops, k, v)
    try:
        mem = BlockOnFault(rig.dma, block_on_fault=False, page_request=None,
                           on_fault=(faults if faults is not None else []).append)
        ctx = OpContext(mem, _limits(rig), run_batch_entry=lambda _: CompletionRecord(), drain=lambda: None)
        return execute(d, ctx)
    finally:
        for k, v in saved.items():
            setattr(ops, k, v)


def _descriptor(op: str, n_units: int, crc_flags: int) -> Descriptor:
    if op == "memmove":
        return Descriptor(opcode=Opcode.MEMMOVE, src_addr=SRC, dst_addr=DST, xfer_size=n_units * 8)
    if op == "memmove_up":  # overlapping, dst above src: copied downwards
        return Descriptor(opcode=Opcode.MEMMOVE, src_addr=DST, dst_addr=DST + 3 * PAGE_SIZE + 8,
                          xfer_size=n_units * 8)
    if op == "memmove_down":  # overlapping, dst below src
        return Descriptor(opcode=Opcode.MEMMOVE, src_addr=DST + 5 * PAGE_SIZE + 24, dst_addr=DST,
                          xfer_size=n_units * 8)
    if op == "memfill":
        return Descriptor(opcode=Opcode.MEMFILL, src_addr=0x1122334455667788, dst_addr=DST + 8,
                          xfer_size=n_units * 8)
    if op == "dualcast":
        return Descriptor(opcode=Opcode.DUALCAST, src_addr=SRC, dst_addr=DST, xfer_size=n_units * 8,
                          op_specific=op_dualcast(DST2))
    if op == "copy_crc":
        return Descriptor(opcode=Opcode.COPY_CRC, flags=crc_flags, src_addr=SRC, dst_addr=DST,
                          xfer_size=n_units * 8, op_specific=op_crc(0x12345678))
    if op == "cflush":
        return Descriptor(opcode=Opcode.CFLUSH, dst_addr=DST, xfer_size=n_units * 8)
    blocks = max(1, n_units * 8 // UNIT)
    if op == "dif_ins":
        return Descriptor(opcode=Opcode.DIF_INS, src_addr=SRC, dst_addr=DST, xfer_size=blocks * BS,
                          op_specific=op_dif_ins(0, 0, REF, 0, APP))
    if op == "dif_check":
        return Descriptor(opcode=Opcode.DIF_CHECK, src_addr=PROT, xfer_size=blocks * UNIT,
                          op_specific=op_dif_check(0, 0, REF, 0, APP))
    if op == "dif_strp":
        return Descriptor(opcode=Opcode.DIF_STRP, src_addr=PROT, dst_addr=DST, xfer_size=blocks * UNIT,
                          op_specific=op_dif_check(0, 0, REF, 0, APP))
    assert op == "dif_updt"
    return Descriptor(opcode=Opcode.DIF_UPDT, src_addr=PROT, dst_addr=DST, xfer_size=blocks * UNIT,
                      op_specific=op_dif_updt(0, 0, 0, REF, 0, APP, REF + 7, 0, APP))


OPS = ["memmove", "memmove_up", "memmove_down", "memfill", "dualcast", "copy_crc", "cflush",
       "dif_ins", "dif_check", "dif_strp", "dif_updt"]
HOLE = st.tuples(st.sampled_from([SRC, DST, DST2, PROT]), st.integers(0, SPAN // PAGE_SIZE))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(OPS), n_units=st.integers(1, (2 * MiB) // 8),
       unmapped=st.lists(HOLE, max_size=3), readonly=st.lists(HOLE, max_size=2),
       crc_flags=st.sampled_from([0, CRC_FLAG_BYPASS_CRC_INV_REF, CRC_FLAG_BYPASS_DATA_REF,
                                  CRC_FLAG_BYPASS_CRC_INV_REF | CRC_FLAG_BYPASS_DATA_REF]))
def test_steps_give_the_record_and_memory_of_one_pass(rig: Rig, op: str, n_units: int,
                                                      unmapped: list[tuple[int, int]],
                                                      readonly: list[tuple[int, int]], crc_flags: int) -> None:
    d = _descriptor(op, n_units, crc_flags)
    zero = bytes(3 * MiB)
    out: list[tuple[CompletionRecord, bytes, bytes, set[int]]] = []
    for chunks in (TINY, WHOLE):
        rig.write(DST, zero)
        rig.write(DST2, zero)
        rig.write(DST, rig.read(SRC, 64 * 1024))  # overlapping moves copy within DST: give it content
        rig.iommu.unmapped = {(base + page * PAGE_SIZE) >> 12 for base, page in unmapped}
        rig.iommu.readonly = {(base + page * PAGE_SIZE) >> 12 for base, page in readonly}
        faults: list[DmaFault] = []
        try:
            rec = _run(rig, d, chunks, faults)
        finally:
            rig.iommu.unmapped, rig.iommu.readonly = set(), set()
        out.append((rec, rig.read(DST, 3 * MiB), rig.read(DST2, 3 * MiB), {int(f.iova) for f in faults}))
    (rec_a, dst_a, dst2_a, faults_a), (rec_b, dst_b, dst2_b, faults_b) = out
    assert rec_a == rec_b
    assert dst_a == dst_b and dst2_a == dst2_b
    if rec_a.code == DsaStatus.PAGE_FAULT_NOBOF:  # the fault that stopped it was reported (the one pass
        assert rec_a.fault_addr in faults_a and rec_a.fault_addr in faults_b  # also probed beyond it)
