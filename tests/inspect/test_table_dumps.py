"""Tree dumps list exactly what is mapped, and the walk picture is a
well-formed SVG naming each level; the CLI shows both (and the old
``inspect`` listings still work)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvctl.cli import main as cli
from pviommu.addr import Gpa, Iova
from pviommu.mem.bank import bank_base
from pviommu.pt.common import Perm
from pviommu.v1 import admin_pb2
from tests.kit.hvkit import ADMIN_TOKEN, HvEnv, MiB
from tests.kit.inspectkit import DATA_START, DOM, HOLE, RAM, RO, Nested, nested

IOVA_BASE = 0x40_0000_0000
RW = Perm.READ | Perm.WRITE
#: x: the driver's format never sets XD (generic_pt), so every leaf is executable
PERM_TEXT = {RW: "rwxu", Perm.READ: "r-xu"}


@pytest.fixture
def rig(make_hv: Callable[..., HvEnv]) -> Nested:
    return nested(make_hv())


def _ranges(dump: admin_pb2.TableDump) -> list[tuple[int, int, int, str]]:
    assert dump.result.status == 0, dump.result.message
    return [(r.va, r.oa, r.size, r.perm) for r in dump.ranges]


# (IOVA gap in 4 KiB pages before the range, pages, 2 MiB leaves?, GPA pick, perm)
ranges = st.lists(st.tuples(st.integers(1, 600), st.integers(1, 40), st.booleans(), st.integers(0, 1 << 20),
                            st.sampled_from([RW, Perm.READ])), min_size=1, max_size=6)


@settings(settings.get_profile("inspect"), max_examples=15)
@given(spec=ranges)
def test_stage1_dump_lists_exactly_the_mapped_ranges(rig: Nested, spec: list[tuple[int, int, bool, int, Perm]]
                                                     ) -> None:
    expected: list[tuple[int, int, int, str]] = []
    iova = IOVA_BASE
    used: set[int] = set()
    for gap, pages, big, pick, perm in spec:
        if big:  # a 2 MiB leaf: both addresses 2 MiB aligned
            iova = (iova + gap * 4096 + 2 * MiB - 1) & ~(2 * MiB - 1)
            size, gpa = 2 * MiB, DATA_START + (pick % 6) * 2 * MiB
        else:
            iova += gap * 4096
            size, gpa = pages * 4096, DATA_START + (pick % ((RAM - DATA_START) // 4096 - pages)) * 4096
        if any(p in used for p in range(gpa >> 12, (gpa + size) >> 12)):
            continue  # keep GPAs distinct so neighbours never merge by accident
        used.update(range(gpa >> 12, (gpa + size) >> 12))
        rig.s1.map(Iova(iova), Gpa(gpa), size, perm)
        expected.append((iova, gpa, size, PERM_TEXT[perm]))
        iova += size + 4096  # a hole after every range
    try:
        dump = rig.env.admin.DumpStage1(admin_pb2.DumpStage1Request(partition_id=rig.guest.pid, domain_id=DOM))
        assert _ranges(dump) == expected
        assert (dump.input_space, dump.output_space, dump.root) == ("IOVA", "GPA", int(rig.s1.root))
        leaves = [e for e in dump.entries if e.type == "OA"]
        assert sum(1 << e.size_lg2 for e in leaves) == sum(r[2] for r in expected)
        assert dump.tables_read == rig.s1.table_pages and not dump.truncated
    finally:
        rig.unmap_all([(r[0], r[2]) for r in expected])


def test_stage2_dump_lists_the_partition_ram_minus_holes_with_read_only_ranges(rig: Nested) -> None:
    dump = rig.env.admin.DumpStage2(admin_pb2.DumpStage2Request(partition_id=rig.guest.pid))
    got = _ranges(dump)
    base = bank_base(rig.guest.pid)
    assert all(oa == base + va for va, oa, _, _ in got)  # GPA g is bank offset g
    covered = [(va, va + size, "w" in perm) for va, _, size, perm in got]
    # merge neighbours with equal rights (the dump splits at leaf-size changes only when OA jumps)
    merged: list[tuple[int, int, bool]] = []
    for start, end, w in covered:
        if merged and merged[-1][1] == start and merged[-1][2] == w:
            merged[-1] = (merged[-1][0], end, w)
        else:
            merged.append((start, end, w))
    hole_end, ro_end = HOLE[0] + HOLE[1], RO[0] + RO[1]
    assert merged == [(0, HOLE[0], True), (hole_end, RO[0], True), (RO[0], ro_end, False), (ro_end, RAM, True)]
    assert (dump.input_space, dump.output_space) == ("GPA", "HPA")


def test_dump_of_an_unknown_domain_is_refused_in_the_body(rig: Nested) -> None:
    dump = rig.env.admin.DumpStage1(admin_pb2.DumpStage1Request(partition_id=rig.guest.pid, domain_id=99))
    assert dump.result.status_name == "HV_STATUS_INVALID_PARAMETER" and not dump.entries


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli(list(argv))
    return rc, capsys.readouterr().out


def test_cli_prints_the_trees_and_the_walk_and_draws_an_svg_naming_each_level(
        rig: Nested, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    iova = IOVA_BASE + 0x7000
    rig.s1.map(Iova(iova), Gpa(DATA_START), 4096, RW)
    addr, pid = rig.env.address, str(rig.guest.pid)
    rc, out = _run(capsys, "inspect", addr, "stage1", "--token", ADMIN_TOKEN, "--partition", pid, "--domain",
                   str(DOM), "--json")
    assert rc == 0 and json.loads(out)["ranges"] == [
        {"va": hex(iova), "oa": hex(DATA_START), "size": "4096", "perm": "rwxu"}]  # addresses in hex
    rc, out = _run(capsys, "inspect", addr, "stage1", "--token", ADMIN_TOKEN, "--partition", pid, "--domain",
                   str(DOM))
    assert rc == 0 and f"IOVA {iova:#x}..{iova + 4095:#x} -> GPA {DATA_START:#x}" in out
    assert [ln.strip()[:2] for ln in out.splitlines() if "L" in ln[:12]] == ["L3", "L2", "L1", "L0"]
    rc, out = _run(capsys, "inspect", addr, "stage2", "--token", ADMIN_TOKEN, "--partition", pid)
    assert rc == 0 and "mapped ranges (" in out and "GPA 0x0.." in out

    svg = tmp_path / "walk.svg"
    rc, out = _run(capsys, "inspect", addr, "explain", "--token", ADMIN_TOKEN, "--partition", pid, "--device",
                   hex(rig.dev), "--iova", hex(iova + 8), "--write", "--svg", str(svg))
    assert rc == 0 and f"result: HPA {bank_base(rig.guest.pid) + DATA_START + 8:#x}" in out
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for level in (3, 2, 1, 0):
        assert f"Stage-1 level {level}" in texts
    assert "Stage-2 walk of the data page" in texts and "Result" in texts
    assert any(t.startswith("HPA ") for t in texts)

    # a fault draws too, and names it
    rc, out = _run(capsys, "inspect", addr, "explain", "--token", ADMIN_TOKEN, "--partition", pid, "--domain",
                   str(DOM), "--iova", hex(iova + 0x1000), "--svg", str(svg), "--json")
    assert rc == 0 and json.loads(out)["fault_reason_name"] == "FS_NOT_PRESENT"
    rc, _ = _run(capsys, "inspect", addr, "explain", "--token", ADMIN_TOKEN, "--partition", pid, "--domain",
                 str(DOM), "--iova", hex(iova + 0x1000), "--fail-on-status")
    assert rc == 1, "a faulting walk exits 1 when --fail-on-status asks for it"
    texts = [t.text or "" for t in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert any("FS_NOT_PRESENT" in t for t in texts)


def test_the_existing_inspect_listings_still_work(rig: Nested, capsys: pytest.CaptureFixture[str]) -> None:
    for what in ("partitions", "devices", "domains", "stats", "faults"):
        rc, out = _run(capsys, "inspect", rig.env.address, what, "--token", ADMIN_TOKEN, "--json")
        assert rc == 0 and isinstance(json.loads(out), list)
    rc, out = _run(capsys, "inspect", rig.env.address, "domains", "--token", ADMIN_TOKEN, "--json")
    assert [d["domainId"] for d in json.loads(out)] == [hex(DOM)]
