"""One nested walk (``Admin.ExplainIova``'s answer) as an SVG picture.

Plain string building, no dependency: one column per stage-1 level -- its
stage-2 sub-walk (the table pointer GPA -> HPA), then the stage-1 entry read
there -- then a column for the stage-2 walk of the output GPA, then the result
(the HPA, or the fault and why). Arrows follow the walk.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

from pviommu.v1 import admin_pb2

COL_W = 270
ROW_H = 18
PAD = 12
HEAD_H = 40
GAP = 40
FONT = "font-family='monospace' font-size='11'"
COLORS = {"S1": "#dbeafe", "S2": "#fef3c7", "ok": "#dcfce7", "fault": "#fee2e2", "box": "#f8fafc"}


def _text(x: float, y: float, s: str, weight: str = "normal", anchor: str = "start") -> str:
    return f"<text x='{x:.0f}' y='{y:.0f}' {FONT} font-weight='{weight}' text-anchor='{anchor}'>{escape(s)}</text>"


def _rect(x: float, y: float, w: float, h: float, fill: str, stroke: str = "#334155") -> str:
    return f"<rect x='{x:.0f}' y='{y:.0f}' width='{w:.0f}' height='{h:.0f}' rx='6' fill='{fill}' stroke='{stroke}'/>"


def _step_line(s: Any) -> str:
    if s.stage == "S2":
        kind = s.note.split(" ", 1)[0]
        return f"S2 L{s.level}[{s.index:3d}] {s.entry:#018x} {kind}"
    return f"S1 L{s.level}[{s.index:3d}] {s.entry:#018x} {s.note}"


def _column(x: float, title: str, subtitle: str, steps: list[Any], s1: Any | None) -> tuple[list[str], float]:
    """A box: title, the stage-2 rows, then the stage-1 row; returns (svg parts, height)."""
    rows = len(steps) + (1 if s1 is not None else 0)
    h = HEAD_H + max(1, rows) * ROW_H + PAD
    parts = [_rect(x, 60, COL_W, h, COLORS["box"]), _text(x + 8, 76, title, "bold"), _text(x + 8, 92, subtitle)]
    y = 60 + HEAD_H
    for s in steps:
        parts.append(_rect(x + 6, y, COL_W - 12, ROW_H - 2, COLORS["S2"], "#d97706"))
        parts.append(_text(x + 10, y + 12, _step_line(s)))
        y += ROW_H
    if s1 is not None:
        parts.append(_rect(x + 6, y, COL_W - 12, ROW_H - 2, COLORS["S1"], "#2563eb"))
        parts.append(_text(x + 10, y + 12, _step_line(s1), "bold"))
    elif not steps:
        parts.append(_text(x + 10, y + 12, "(nothing read)"))
    return parts, h


def walk_svg(reply: admin_pb2.ExplainIovaReply, iova: int, write: bool, title: str = "") -> str:
    """The picture of ``reply`` (the explanation of ``iova``)."""
    cols: list[tuple[str, str, list[Any], Any | None]] = []
    for lv in reply.levels:
        sub = f"table GPA {lv.table_gpa:#x}"
        if lv.stage2:
            sub += f" -> HPA {lv.stage2[-1].table_hpa:#x}" if not lv.has_stage1 else \
                f" -> HPA {lv.stage1.table_hpa:#x}"
        cols.append((f"Stage-1 level {lv.level}", sub, list(lv.stage2), lv.stage1 if lv.has_stage1 else None))
    if reply.final_stage2:
        gpa = reply.final_stage2[0].va
        what = "output GPA" if reply.levels else "IOVA as GPA (no stage 1)"
        cols.append(("Stage-2 walk of the data page", f"{what} {gpa:#x}", list(reply.final_stage2), None))
    parts: list[str] = []
    x = float(PAD)
    height = 0.0
    for i, (t, sub, steps, s1) in enumerate(cols):
        col, h = _column(x, t, sub, steps, s1)
        parts += col
        height = max(height, h)
        if i:
            parts.append(f"<line x1='{x - GAP + 2:.0f}' y1='80' x2='{x - 4:.0f}' y2='80' stroke='#334155' "
                         f"marker-end='url(#arrow)'/>")
        x += COL_W + GAP
    if reply.ok:
        result = [f"HPA {reply.hpa:#x}", f"2^{reply.size_lg2} page, {'write' if write else 'read'} allowed"]
        fill = COLORS["ok"]
    else:
        result = [f"fault {reply.fault_reason_name} ({reply.fault_reason:#x})", *_wrap(reply.fault_detail, 38)]
        fill = COLORS["fault"]
    rh = HEAD_H + len(result) * ROW_H
    if cols:
        parts.append(f"<line x1='{x - GAP + 2:.0f}' y1='80' x2='{x - 4:.0f}' y2='80' stroke='#334155' "
                     f"marker-end='url(#arrow)'/>")
    parts.append(_rect(x, 60, COL_W, rh, fill))
    parts.append(_text(x + 8, 76, "Result", "bold"))
    for j, line in enumerate(result):
        parts.append(_text(x + 8, 60 + HEAD_H + j * ROW_H, line))
    width = x + COL_W + PAD
    height = max(height, rh) + 60 + PAD
    head = title or f"{'write' if write else 'read'} of IOVA {iova:#x}: context {reply.pgtt or 'unreadable'} " \
                    f"DID {reply.did}, {reply.reads} entry reads"
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}'>"
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
        "orient='auto'><path d='M0,0 L10,5 L0,10 z' fill='#334155'/></marker></defs>"
        f"<rect width='100%' height='100%' fill='white'/>{_text(PAD, 30, head, 'bold')}"
        + "".join(parts) + "</svg>\n"
    )


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    return lines[:6]
