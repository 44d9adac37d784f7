"""Tables and walks as text: the stage-1/stage-2 tree of a ``TableDump`` and
every step of an ``ExplainIovaReply`` (what ``pviommu inspect`` prints and
what ``Admin.dump_stage1/2`` and ``Admin.explain`` give as ``.text()``)."""

from __future__ import annotations

from pviommu.v1 import admin_pb2


def _size(lg2: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if lg2 >= shift:
            return f"{1 << (lg2 - shift)}{unit}"
    return str(1 << lg2)


def dump_text(dump: admin_pb2.TableDump, title: str) -> str:
    """The tree, one present entry a line, indented by depth; then the ranges."""
    lines = [f"{title}: {dump.format}, {dump.input_space} -> {dump.output_space}, root {dump.table_space} "
             f"{dump.root:#x}, {dump.tables_read} table pages"]
    top = max((e.level for e in dump.entries), default=0)
    entries = list(dump.entries)
    i = 0
    while i < len(entries):
        e = entries[i]
        pad = "  " * (top - e.level)
        if e.type == "TABLE":
            tail = f"table {dump.table_space} {e.oa:#x}" + (f"  UNREADABLE: {e.error}" if e.error else "")
            lines.append(f"{pad}L{e.level}[{e.index:3d}] {dump.input_space} {e.va:#x}: {tail}")
            i += 1
            continue
        # a run of leaves of one table with contiguous VA and OA and equal rights: one line
        j, step = i + 1, 1 << e.size_lg2
        while (j < len(entries) and entries[j].type == "OA" and entries[j].table == e.table
               and entries[j].va == e.va + (j - i) * step and entries[j].oa == e.oa + (j - i) * step
               and entries[j].perm == e.perm):
            j += 1
        n = j - i
        where = f"[{e.index:3d}]" if n == 1 else f"[{e.index}..{entries[j - 1].index}]"
        what = f"{_size(e.size_lg2)} leaf" if n == 1 else f"{n} x {_size(e.size_lg2)} leaves"
        lines.append(f"{pad}L{e.level}{where} {dump.input_space} {e.va:#x}: {what} -> {dump.output_space} "
                     f"{e.oa:#x} {e.perm}")
        i = j
    if dump.truncated:
        lines.append("... truncated: too many table pages")
    lines.append(f"mapped ranges ({len(dump.ranges)}):")
    for r in dump.ranges:
        lines.append(f"  {dump.input_space} {r.va:#x}..{r.va + r.size - 1:#x} -> {dump.output_space} {r.oa:#x} "
                     f"({r.size:#x} bytes) {r.perm}")
    return "\n".join(lines)


def _step_text(s: admin_pb2.WalkStep) -> str:
    if s.stage == "S2":
        return f"S2 L{s.level}[{s.index:3d}] of HPA {s.table:#x} = {s.entry:#018x}  {s.note}"
    return f"S1 L{s.level}[{s.index:3d}] of GPA {s.table:#x} (HPA {s.table_hpa:#x}) = {s.entry:#018x}  {s.note}"


def explain_text(reply: admin_pb2.ExplainIovaReply, iova: int, write: bool) -> str:
    lines = [f"{'write' if write else 'read'} of IOVA {iova:#x}: context {reply.pgtt or 'unreadable'} "
             f"DID {reply.did} (slot {reply.slot})", f"  {reply.context}"]
    for lv in reply.levels:
        lines.append(f"stage-1 level {lv.level}: table at GPA {lv.table_gpa:#x}")
        lines += [f"    {_step_text(s)}" for s in lv.stage2]
        if lv.has_stage1:
            lines.append(f"  {_step_text(lv.stage1)}")
    if reply.final_stage2:
        lines.append(f"stage 2 of {'the output GPA' if reply.levels else 'the IOVA as GPA'} "
                     f"{reply.final_stage2[0].va:#x}:")
        lines += [f"    {_step_text(s)}" for s in reply.final_stage2]
    if reply.ok:
        lines.append(f"result: HPA {reply.hpa:#x} (2^{reply.size_lg2} page, {'write' if write else 'read'} "
                     f"allowed), {reply.reads} entry reads")
    else:
        lines.append(f"result: fault {reply.fault_reason_name} ({reply.fault_reason:#x}): {reply.fault_detail}")
    return "\n".join(lines)
