"""Random descriptors (any opcode, flags, sizes, addresses) always complete
with a defined DsaStatus and never write outside writable pages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pviommu.abi.dsa import COMP_SIZE, STATUS_MASK, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE
from tests.kit.rig import BANK_SIZE, DEDICATED_WQ, SHARED_WQ, Rig

WINDOW = 0x100000  # data addresses live in [WINDOW, WINDOW + SPAN)
SPAN = 0x40000
UNMAPPED_PAGE = WINDOW + 0x10000
READONLY_PAGE = WINDOW + 0x20000
COMP_PAGE = 0x8000
#: Writes can reach at most the window plus one maximal transfer (2 MiB) and a
#: DIF expansion; everything from LIMIT on must never change.
LIMIT = WINDOW + SPAN + (3 << 20)


_TAIL: dict[int, bytes] = {}


def tail_before(r: Rig) -> bytes:
    """The bank beyond LIMIT as it was when the fuzz rig was made."""
    return _TAIL[id(r)]


@pytest.fixture(scope="module")
def frig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(Path(tmp_path_factory.mktemp("fuzz")))
    r.iommu.unmapped.add(UNMAPPED_PAGE >> PAGE_SHIFT)
    r.iommu.readonly.add(READONLY_PAGE >> PAGE_SHIFT)
    r.device.on_page_request = lambda fault: False
    _TAIL[id(r)] = r.read(LIMIT, BANK_SIZE - LIMIT)
    yield r
    r.close()


addr = st.one_of(
    st.integers(WINDOW, WINDOW + SPAN - 1),
    st.sampled_from([UNMAPPED_PAGE - 8, UNMAPPED_PAGE, READONLY_PAGE - 64, READONLY_PAGE]),
    st.integers(WINDOW, WINDOW + SPAN - 1).map(lambda a: a & ~63),
    st.integers(BANK_SIZE, 2**64 - 1),  # beyond the bank: translation faults
)
opcode = st.one_of(st.sampled_from([int(o) for o in Opcode]), st.integers(0, 255))
flags = st.one_of(st.integers(0, 0xFFFFFF), st.sampled_from([0, int(DescFlags.BOF), int(DescFlags.CR),
                                                             int(DescFlags.FENCE), 0x10000, 0x20000]))
size = st.one_of(st.integers(0, 3 * PAGE_SIZE), st.sampled_from([8, 16, 512, 520, 1024, 4104]),
                 st.integers(0, 2**32 - 1))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=opcode, fl=flags, src=addr, dst=addr, n=size, ops=st.binary(min_size=24, max_size=24),
       zero_ops=st.booleans(), shared=st.booleans(), fill=st.binary(min_size=64, max_size=512))
def test_random_descriptor_has_defined_status_and_stays_in_bounds(
        frig: Rig, op: int, fl: int, src: int, dst: int, n: int, ops: bytes, zero_ops: bool, shared: bool,
        fill: bytes) -> None:
    frig.write(WINDOW, fill * (0x2000 // len(fill)))
    comp = COMP_PAGE
    frig.write(comp, bytes(COMP_SIZE))
    before = frig.read(0, LIMIT)
    d = Descriptor(opcode=op, flags=(fl | DescFlags.CRAV | DescFlags.RCR) & ~DescFlags.RCI,
                   completion_addr=comp, src_addr=src, dst_addr=dst, xfer_size=n,
                   op_specific=bytes(24) if zero_ops else ops)
    wq = SHARED_WQ if shared else DEDICATED_WQ
    assert frig.device.submit(wq, d)
    rec = frig.wait(comp)
    assert rec.code in DsaStatus._value2member_map_ and rec.code != DsaStatus.HW_ERR1
    assert rec.status & STATUS_MASK != 0
    after = frig.read(0, LIMIT)
    ro, um = READONLY_PAGE, UNMAPPED_PAGE
    assert after[ro : ro + PAGE_SIZE] == before[ro : ro + PAGE_SIZE]
    assert after[um : um + PAGE_SIZE] == before[um : um + PAGE_SIZE]
    # outside the data window only the completion record page may change
    assert after[: COMP_PAGE] == before[: COMP_PAGE]
    assert after[COMP_PAGE + PAGE_SIZE : WINDOW] == before[COMP_PAGE + PAGE_SIZE : WINDOW]
    assert frig.bank.view[LIMIT:] == tail_before(frig)
