"""No operation allocates memory in proportion to its transfer size.

A subprocess (its own peak RSS, VmHWM) runs 2 GiB operations of every kind
against an unmapped IOVA and against buffers of which only the first 4 MiB
are mapped; its peak must stay within a bound that has nothing to do with
2 GiB (before the operations worked in steps, one MEMFILL took 4 GiB).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from dma_device.dsa.access import BlockOnFault
    from dma_device.dsa.checks import Limits
    from dma_device.dsa.device import SUPPORTED_OPCODES, _opcap_of
    from dma_device.dsa.ops import OpContext, execute
    from pviommu.abi import dsa
    from pviommu.abi.dsa import CompletionRecord, Descriptor, GenCap, Opcode
    from pviommu.addr import Hpa, Iova
    from pviommu.mem.bank import HostMemory
    from pviommu.mem.dma import DmaFault, DmaMemory, DmaRuns, Run

    WINDOW, MAPPED = 4 << 30, 4 << 20  # IOVA k*4 GiB + [0, 4 MiB) -> bank offset k*4 MiB (k < 3)

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    class Windows:
        def __init__(self, bank):
            self.bank = bank
        def translate(self, iova, length, write):
            k, off = divmod(int(iova), WINDOW)
            if k >= 3 or off >= MAPPED:
                return DmaRuns([], DmaFault(Iova(iova), write, 1, "NOT_PRESENT"))
            n = min(length, MAPPED - off)
            fault = DmaFault(Iova(iova + n), write, 1, "NOT_PRESENT") if n < length else None
            return DmaRuns([Run(Hpa(self.bank.base + k * MAPPED + off), n)], fault)

    host = HostMemory(Path(sys.argv[1]))
    bank = host.create_bank(1, 3 * MAPPED)
    dma = DmaMemory(host, Windows(bank))
    gc = GenCap(max_xfer_shift=31)
    lim = Limits(gencap=gc, max_xfer=gc.max_xfer_size, max_batch=32, wq_bof=False, shared=False,
                 wq_priv=False, num_int_handles=9, opcap=_opcap_of(SUPPORTED_OPCODES))
    N = 1 << 31
    DIF_N, DIF_UNIT_N = N // 512 * 512 - 512, (N // 520) * 520
    NOWHERE = 1 << 45
    cases = {
        "memfill_unmapped": Descriptor(opcode=Opcode.MEMFILL, src_addr=0x55, dst_addr=NOWHERE, xfer_size=N),
        "memfill_partly": Descriptor(opcode=Opcode.MEMFILL, src_addr=0x55, dst_addr=WINDOW, xfer_size=N),
        "memmove_partly": Descriptor(opcode=Opcode.MEMMOVE, src_addr=0, dst_addr=WINDOW, xfer_size=N),
        "memmove_unmapped_dst": Descriptor(opcode=Opcode.MEMMOVE, src_addr=0, dst_addr=NOWHERE, xfer_size=N),
        "dualcast_partly": Descriptor(opcode=Opcode.DUALCAST, src_addr=0, dst_addr=WINDOW, xfer_size=N,
                                      op_specific=dsa.op_dualcast(2 * WINDOW)),
        "copy_crc_partly": Descriptor(opcode=Opcode.COPY_CRC, src_addr=0, dst_addr=WINDOW, xfer_size=N,
                                      op_specific=dsa.op_crc(0)),
        "copy_crc_unmapped": Descriptor(opcode=Opcode.COPY_CRC, src_addr=NOWHERE, dst_addr=WINDOW,
                                        xfer_size=N, op_specific=dsa.op_crc(0)),
        "crcgen_partly": Descriptor(opcode=Opcode.CRCGEN, src_addr=0, xfer_size=N, op_specific=dsa.op_crc(0)),
        "compare_partly": Descriptor(opcode=Opcode.COMPARE, src_addr=0, dst_addr=0, xfer_size=N),
        "cflush_partly": Descriptor(opcode=Opcode.CFLUSH, dst_addr=0, xfer_size=N),
        "dif_ins_partly": Descriptor(opcode=Opcode.DIF_INS, src_addr=0, dst_addr=WINDOW, xfer_size=DIF_N,
                                     op_specific=dsa.op_dif_ins(0, 0, 1, 0xFFFF, 0)),
        "dif_check_partly": Descriptor(opcode=Opcode.DIF_CHECK, src_addr=0, xfer_size=DIF_UNIT_N,
                                       op_specific=dsa.op_dif_check(0, 0, 1, 0xFFFF, 0)),
        "dif_strp_unmapped_dst": Descriptor(opcode=Opcode.DIF_STRP, src_addr=0, dst_addr=NOWHERE,
                                            xfer_size=DIF_UNIT_N, op_specific=dsa.op_dif_check(0, 0, 1, 0xFFFF, 0)),
        "dif_updt_partly": Descriptor(opcode=Opcode.DIF_UPDT, src_addr=0, dst_addr=WINDOW, xfer_size=DIF_UNIT_N,
                                      op_specific=dsa.op_dif_updt(0, 0, 0, 1, 0xFFFF, 0, 1, 0xFFFF, 0)),
    }
    # the DIF checks should see good tuples in the mapped part: DIF_INS them there first
    out = {"start": hwm(), "cases": {}}
    for name, d in cases.items():
        mem = BlockOnFault(dma, block_on_fault=False, page_request=None, on_fault=lambda f: None)
        rec = execute(d, OpContext(mem, lim, run_batch_entry=lambda _: CompletionRecord(), drain=lambda: None))
        out["cases"][name] = {"status": rec.status, "bytes_completed": rec.bytes_completed,
                              "fault_addr": rec.fault_addr, "hwm": hwm()}
    print(json.dumps(out))
''')

#: Growth of the peak RSS allowed over the start (the bank is 12 MiB and every
#: step is at most a few MiB; 2 GiB operations used to add 2-4 GiB each).
BOUND = 128 << 20


def test_two_gib_operations_on_unmapped_and_partly_mapped_iovas_stay_within_a_fixed_memory_bound(
        tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    start = out["start"]
    cases = out["cases"]
    grown = {name: (c["hwm"] - start) >> 20 for name, c in cases.items()}
    assert all(g <= BOUND >> 20 for g in grown.values()), f"peak RSS growth per case (MiB): {grown}"
    # they did run, and stopped where the mapping ends (status 0x03 with the 0x80 write bit or not)
    mapped = 4 << 20
    for name, c in cases.items():
        assert c["status"] & 0x3F in (0x03, 0x09), (name, c)
        if name.endswith("_unmapped"):
            assert c["bytes_completed"] == 0, (name, c)
    assert cases["memfill_partly"]["bytes_completed"] == mapped
    assert cases["memfill_partly"]["fault_addr"] == (4 << 30) + mapped
    assert cases["memmove_partly"]["bytes_completed"] == mapped
    assert cases["copy_crc_partly"]["bytes_completed"] == mapped
    assert cases["dif_ins_partly"]["bytes_completed"] == mapped // 520 * 512
