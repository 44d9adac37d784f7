"""DSA work by name: descriptors built from keyword fields, records decoded.

``build("memmove", dst=..., src=..., size=...)`` makes the 64-byte
descriptor with the layouts of ``pviommu.abi.dsa`` (nothing is re-declared
here); ``Completion`` decodes a 32-byte record into the fields a driver
reads (status by name, bytes completed, fault address, CRC, delta size, DIF
tags). ``OPERATIONS`` lists every named operation with its fields, for
``Device`` methods and ``pviommu guest ADDR submit op=NAME``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pviommu.abi import dsa
from pviommu.abi.dsa import COMP_SIZE, CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.client.errors import DsaError, dsa_status_name
from pviommu.client.memory import Mapping

#: Flags every named operation sets: a completion record is requested at a valid address.
RECORD_FLAGS = int(DescFlags.CRAV | DescFlags.RCR)

Addr = int | Mapping


def iova_of(addr: Addr | None, what: str) -> int:
    """The IOVA of a mapping (its start) or of a plain integer."""
    if addr is None:
        raise ValueError(f"{what}= is required")
    if isinstance(addr, Mapping):
        return addr.iova
    if isinstance(addr, bool) or not isinstance(addr, int):
        raise TypeError(f"{what}= takes an IOVA (int) or a Mapping, not {type(addr).__name__} "
                        "(map a Buffer first: device.map(buffer))")
    return addr


def size_of(size: int | None, *addrs: Addr | None) -> int:
    """``size``, or the smallest size of the mappings given as addresses."""
    if size is not None:
        return size
    sizes = [a.size for a in addrs if isinstance(a, Mapping)]
    if not sizes:
        raise ValueError("size= is required when the addresses are plain IOVAs")
    return min(sizes)


def _u64(pattern: int | bytes) -> int:
    """An 8-byte pattern from an int (little endian) or 1, 2, 4 or 8 bytes repeated."""
    if isinstance(pattern, bytes):
        if len(pattern) not in (1, 2, 4, 8):
            raise ValueError(f"a byte pattern is 1, 2, 4 or 8 bytes (repeated to 8), not {len(pattern)}")
        return int.from_bytes(pattern * (8 // len(pattern)), "little")
    return pattern & 0xFFFF_FFFF_FFFF_FFFF


def _dif_flags(block_size: int, dif_flags: int) -> int:
    try:
        return dsa.DIF_BLOCK_SIZES.index(block_size) | (dif_flags & ~0x3)
    except ValueError:
        raise ValueError(f"block_size {block_size} is not one of {', '.join(map(str, dsa.DIF_BLOCK_SIZES))}") from None


@dataclass(frozen=True)
class OpSpec:
    """A named operation: its opcode, its fields (name, meaning) and its builder."""

    name: str
    opcode: Opcode
    fields: tuple[tuple[str, str], ...]
    build: Callable[..., Descriptor] = field(repr=False)
    summary: str = ""


def _desc(opcode: Opcode, flags: int = 0, **kw: Any) -> Descriptor:
    return Descriptor(opcode=int(opcode), flags=RECORD_FLAGS | flags, **kw)


def _memmove(dst: Addr, src: Addr, size: int | None = None, flags: int = 0) -> Descriptor:
    return _desc(Opcode.MEMMOVE, flags, src_addr=iova_of(src, "src"), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, dst, src))


def _fill(dst: Addr, pattern: int | bytes = 0, size: int | None = None, flags: int = 0) -> Descriptor:
    return _desc(Opcode.MEMFILL, flags, src_addr=_u64(pattern), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, dst))


def _check_result(expected: int | None) -> tuple[int, bytes]:
    if expected is None:
        return 0, dsa.op_compare()
    return int(DescFlags.CR), dsa.op_compare(expected)


def _compare(src: Addr, src2: Addr, size: int | None = None, expected: int | None = None,
             flags: int = 0) -> Descriptor:
    cr, ops = _check_result(expected)
    return _desc(Opcode.COMPARE, flags | cr, src_addr=iova_of(src, "src"), dst_addr=iova_of(src2, "src2"),
                 xfer_size=size_of(size, src, src2), op_specific=ops)


def _compare_pattern(src: Addr, pattern: int | bytes = 0, size: int | None = None, expected: int | None = None,
                     flags: int = 0) -> Descriptor:
    cr, ops = _check_result(expected)
    return _desc(Opcode.COMPVAL, flags | cr, src_addr=iova_of(src, "src"), dst_addr=_u64(pattern),
                 xfer_size=size_of(size, src), op_specific=ops)


def _delta_create(src: Addr, src2: Addr, delta: Addr, size: int | None = None, max_delta_size: int | None = None,
                  expected_mask: int | None = None, flags: int = 0) -> Descriptor:
    n = size_of(size, src, src2)
    room = max_delta_size if max_delta_size is not None else (
        delta.size if isinstance(delta, Mapping) else n // 8 * dsa.DELTA_ENTRY_SIZE)
    room -= room % dsa.DELTA_ENTRY_SIZE
    cr = int(DescFlags.CR) if expected_mask is not None else 0
    return _desc(Opcode.CR_DELTA, flags | cr, src_addr=iova_of(src, "src"), dst_addr=iova_of(src2, "src2"),
                 xfer_size=n, op_specific=dsa.op_cr_delta(iova_of(delta, "delta"), room, expected_mask or 0))


def _delta_apply(dst: Addr, delta: Addr, delta_size: int, size: int | None = None, flags: int = 0) -> Descriptor:
    return _desc(Opcode.AP_DELTA, flags, src_addr=iova_of(delta, "delta"), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, dst), op_specific=dsa.op_ap_delta(delta_size))


def _dualcast(dst: Addr, dst2: Addr, src: Addr, size: int | None = None, flags: int = 0) -> Descriptor:
    return _desc(Opcode.DUALCAST, flags, src_addr=iova_of(src, "src"), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, dst, dst2, src), op_specific=dsa.op_dualcast(iova_of(dst2, "dst2")))


def _crc(src: Addr, size: int | None = None, seed: int = 0, flags: int = 0) -> Descriptor:
    return _desc(Opcode.CRCGEN, flags, src_addr=iova_of(src, "src"), xfer_size=size_of(size, src),
                 op_specific=dsa.op_crc(seed))


def _copy_crc(dst: Addr, src: Addr, size: int | None = None, seed: int = 0, flags: int = 0) -> Descriptor:
    return _desc(Opcode.COPY_CRC, flags, src_addr=iova_of(src, "src"), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, dst, src), op_specific=dsa.op_crc(seed))


def _dif_check(src: Addr, size: int | None = None, block_size: int = 512, ref_tag: int = 0, app_tag: int = 0,
               app_tag_mask: int = 0, src_flags: int = 0, dif_flags: int = 0, flags: int = 0) -> Descriptor:
    return _desc(Opcode.DIF_CHECK, flags, src_addr=iova_of(src, "src"), xfer_size=size_of(size, src),
                 op_specific=dsa.op_dif_check(src_flags, _dif_flags(block_size, dif_flags), ref_tag, app_tag_mask,
                                              app_tag))


def _dif_strip(dst: Addr, src: Addr, size: int | None = None, block_size: int = 512, ref_tag: int = 0,
               app_tag: int = 0, app_tag_mask: int = 0, src_flags: int = 0, dif_flags: int = 0,
               flags: int = 0) -> Descriptor:
    return _desc(Opcode.DIF_STRP, flags, src_addr=iova_of(src, "src"), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, src),
                 op_specific=dsa.op_dif_check(src_flags, _dif_flags(block_size, dif_flags), ref_tag, app_tag_mask,
                                              app_tag))


def _dif_insert(dst: Addr, src: Addr, size: int | None = None, block_size: int = 512, ref_tag: int = 0,
                app_tag: int = 0, app_tag_mask: int = 0, dest_flags: int = 0, dif_flags: int = 0,
                flags: int = 0) -> Descriptor:
    return _desc(Opcode.DIF_INS, flags, src_addr=iova_of(src, "src"), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, src),
                 op_specific=dsa.op_dif_ins(dest_flags, _dif_flags(block_size, dif_flags), ref_tag, app_tag_mask,
                                            app_tag))


def _dif_update(dst: Addr, src: Addr, size: int | None = None, block_size: int = 512, ref_tag: int = 0,
                app_tag: int = 0, app_tag_mask: int = 0, src_flags: int = 0, dest_ref_tag: int = 0,
                dest_app_tag: int = 0, dest_app_tag_mask: int = 0, dest_flags: int = 0, dif_flags: int = 0,
                flags: int = 0) -> Descriptor:
    return _desc(Opcode.DIF_UPDT, flags, src_addr=iova_of(src, "src"), dst_addr=iova_of(dst, "dst"),
                 xfer_size=size_of(size, src),
                 op_specific=dsa.op_dif_updt(src_flags, dest_flags, _dif_flags(block_size, dif_flags), ref_tag,
                                             app_tag_mask, app_tag, dest_ref_tag, dest_app_tag_mask, dest_app_tag))


def _cache_flush(dst: Addr, size: int | None = None, flags: int = 0) -> Descriptor:
    return _desc(Opcode.CFLUSH, flags, dst_addr=iova_of(dst, "dst"), xfer_size=size_of(size, dst))


def _noop(flags: int = 0) -> Descriptor:
    return _desc(Opcode.NOOP, flags)


def _drain(flags: int = 0) -> Descriptor:
    return _desc(Opcode.DRAIN, flags)


_SIZE = ("size", "bytes (default: the smallest mapping given)")
_FLAGS = ("flags", "extra descriptor flags, e.g. 0x2 = BOF (CRAV|RCR are always set)")
_DIF = (("block_size", "protected block size: 512, 520, 4096 or 4104"), ("ref_tag", "reference tag seed"),
        ("app_tag", "application tag seed"), ("app_tag_mask", "application tag mask"))

OPERATIONS: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("noop", Opcode.NOOP, (_FLAGS,), _noop, "no operation (a completion record only)"),
    OpSpec("drain", Opcode.DRAIN, (_FLAGS,), _drain, "wait for earlier descriptors of the WQ"),
    OpSpec("memmove", Opcode.MEMMOVE, (("dst", "destination IOVA"), ("src", "source IOVA"), _SIZE, _FLAGS),
           _memmove, "copy size bytes from src to dst"),
    OpSpec("fill", Opcode.MEMFILL, (("dst", "destination IOVA"), ("pattern", "8-byte pattern (little endian)"),
                                    _SIZE, _FLAGS), _fill, "fill dst with an 8-byte pattern"),
    OpSpec("compare", Opcode.COMPARE, (("src", "first IOVA"), ("src2", "second IOVA"), _SIZE,
                                       ("expected", "check result: 0 equal, 1 different (sets CR)"), _FLAGS),
           _compare, "compare two buffers (result 0 equal, 1 different at bytes_completed)"),
    OpSpec("compare_pattern", Opcode.COMPVAL, (("src", "IOVA"), ("pattern", "8-byte pattern"), _SIZE,
                                               ("expected", "check result (sets CR)"), _FLAGS),
           _compare_pattern, "compare a buffer with an 8-byte pattern"),
    OpSpec("delta_create", Opcode.CR_DELTA, (("src", "original IOVA"), ("src2", "changed IOVA"),
                                             ("delta", "IOVA of the delta record"), _SIZE,
                                             ("max_delta_size", "room for the delta record (bytes)"),
                                             ("expected_mask", "acceptable results as a bit mask (sets CR)"),
                                             _FLAGS), _delta_create, "delta record of src2 against src"),
    OpSpec("delta_apply", Opcode.AP_DELTA, (("dst", "IOVA to patch"), ("delta", "IOVA of the delta record"),
                                            ("delta_size", "bytes of the delta record"), _SIZE, _FLAGS),
           _delta_apply, "apply a delta record to dst"),
    OpSpec("dualcast", Opcode.DUALCAST, (("dst", "first destination"), ("dst2", "second destination (same bits "
                                         "11:0 as dst)"), ("src", "source IOVA"), _SIZE, _FLAGS),
           _dualcast, "copy src to two destinations"),
    OpSpec("crc", Opcode.CRCGEN, (("src", "IOVA"), _SIZE, ("seed", "CRC-32C seed"), _FLAGS), _crc,
           "CRC-32C of src (record: crc)"),
    OpSpec("copy_crc", Opcode.COPY_CRC, (("dst", "destination IOVA"), ("src", "source IOVA"), _SIZE,
                                         ("seed", "CRC-32C seed"), _FLAGS), _copy_crc, "copy and CRC-32C"),
    OpSpec("dif_check", Opcode.DIF_CHECK, (("src", "IOVA of blocks with DIF tuples"), _SIZE, *_DIF,
                                           ("src_flags", "source DIF flags"), ("dif_flags", "DIF flags"), _FLAGS),
           _dif_check, "check the DIF tuples of src"),
    OpSpec("dif_insert", Opcode.DIF_INS, (("dst", "IOVA for blocks + tuples"), ("src", "IOVA of plain blocks"),
                                          _SIZE, *_DIF, ("dest_flags", "destination DIF flags"),
                                          ("dif_flags", "DIF flags"), _FLAGS), _dif_insert,
           "append a DIF tuple to each block"),
    OpSpec("dif_strip", Opcode.DIF_STRP, (("dst", "IOVA for plain blocks"), ("src", "IOVA of blocks with tuples"),
                                          _SIZE, *_DIF, ("src_flags", "source DIF flags"),
                                          ("dif_flags", "DIF flags"), _FLAGS), _dif_strip,
           "check and remove the DIF tuples"),
    OpSpec("dif_update", Opcode.DIF_UPDT, (("dst", "IOVA for blocks + new tuples"), ("src", "IOVA of blocks with "
                                           "tuples"), _SIZE, *_DIF, ("src_flags", "source DIF flags"),
                                           ("dest_ref_tag", "new reference tag seed"),
                                           ("dest_app_tag", "new application tag seed"),
                                           ("dest_app_tag_mask", "new application tag mask"),
                                           ("dest_flags", "destination DIF flags"), ("dif_flags", "DIF flags"),
                                           _FLAGS), _dif_update, "check the tuples and write new ones"),
    OpSpec("cache_flush", Opcode.CFLUSH, (("dst", "IOVA"), _SIZE, _FLAGS), _cache_flush,
           "flush a range from the caches"),
)}
#: The spec's and idxd.h's names for the same operations.
ALIASES = {"memfill": "fill", "compval": "compare_pattern", "cr_delta": "delta_create", "ap_delta": "delta_apply",
           "crcgen": "crc", "dif_ins": "dif_insert", "dif_strp": "dif_strip", "dif_updt": "dif_update",
           "cflush": "cache_flush", "copy": "memmove"}


def operation(name: str) -> OpSpec:
    key = name.strip().lower().replace("-", "_")
    spec = OPERATIONS.get(ALIASES.get(key, key))
    if spec is None:
        raise ValueError(f"unknown DSA operation {name!r}; operations: {', '.join(OPERATIONS)}, batch")
    return spec


def build(name: str, **fields: Any) -> Descriptor:
    """The descriptor of operation ``name`` (completion address left 0: the
    submitter fills it in). Unknown fields are refused by name."""
    spec = operation(name)
    known = {f for f, _ in spec.fields}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{spec.name} has no field {', '.join(unknown)} (fields: {', '.join(sorted(known))})")
    return spec.build(**fields)


@dataclass(frozen=True, repr=False)
class Completion:
    """A decoded DSA completion record (``struct dsa_completion_record``).

    ``ok`` is SUCCESS; ``status_name`` the code by name (``DSA_COMP_SUCCESS``,
    ``DSA_COMP_PAGE_FAULT_NOBOF``, ...); ``timed_out`` when the device wrote
    no record in time. ``entries`` holds a batch's per-descriptor records."""

    opcode: int
    record: CompletionRecord
    accepted: bool = True
    timed_out: bool = False
    entries: tuple[Completion, ...] = ()

    @classmethod
    def decode(cls, opcode: int, raw: bytes, *, accepted: bool = True, timed_out: bool = False,
               entries: tuple[Completion, ...] = ()) -> Completion:
        rec = CompletionRecord.unpack(raw) if len(raw) == COMP_SIZE else CompletionRecord()
        return cls(opcode, rec, accepted, timed_out, entries)

    # -- status ----------------------------------------------------------------------
    @property
    def status(self) -> int:
        """The raw status byte (code in bits 0-6, write-fault flag in bit 7)."""
        return self.record.status

    @property
    def code(self) -> int:
        return self.record.code

    @property
    def status_name(self) -> str:
        return dsa_status_name(self.record.code)

    @property
    def ok(self) -> bool:
        return self.accepted and not self.timed_out and self.record.code == DsaStatus.SUCCESS

    @property
    def opcode_name(self) -> str:
        try:
            return Opcode(self.opcode).name
        except ValueError:
            return f"{self.opcode:#x}"

    def check(self) -> Completion:
        """Self when SUCCESS, else raise DsaError with this record."""
        if not self.ok:
            why = "not accepted" if not self.accepted else "no record in time" if self.timed_out else self.status_name
            raise DsaError(f"{self.opcode_name} failed: {why}", dsa_status=self.record.code, record=self)
        return self

    # -- fields ------------------------------------------------------------------------
    @property
    def result(self) -> int:
        """COMPARE/COMPVAL/CR_DELTA result (0 equal, 1 different, 2 overflow), DIF status on DIF_ERR."""
        return self.record.result

    @property
    def bytes_completed(self) -> int:
        return self.record.bytes_completed

    @property
    def descs_completed(self) -> int:
        return self.record.descs_completed

    @property
    def fault_addr(self) -> int:
        return self.record.fault_addr

    @property
    def fault_was_write(self) -> bool:
        return self.record.fault_was_write

    @property
    def crc(self) -> int:
        return self.record.crc_val & 0xFFFF_FFFF

    @property
    def delta_rec_size(self) -> int:
        return self.record.delta_rec_size

    @property
    def invalid_flags(self) -> int:
        return self.record.invalid_flags

    def as_dict(self) -> dict[str, Any]:
        """The record for JSON (addresses and CRC as hex strings)."""
        out: dict[str, Any] = {"opcode": self.opcode_name, "status": f"{self.status:#04x}",
                               "status_name": self.status_name, "ok": self.ok, "accepted": self.accepted,
                               "timed_out": self.timed_out, "result": self.result,
                               "bytes_completed": self.bytes_completed, "fault_addr": f"{self.fault_addr:#x}",
                               "fault_was_write": self.fault_was_write}
        op = self.opcode
        if op in (Opcode.CRCGEN, Opcode.COPY_CRC):
            out["crc"] = f"{self.crc:#010x}"
        if op == Opcode.CR_DELTA:
            out["delta_rec_size"] = self.delta_rec_size
        if self.record.code == DsaStatus.INVALID_FLAGS:
            out["invalid_flags"] = f"{self.invalid_flags:#x}"
        if op in (Opcode.DIF_CHECK, Opcode.DIF_INS, Opcode.DIF_STRP, Opcode.DIF_UPDT):
            r = self.record
            out["dif"] = {"chk_ref_tag": f"{r.dif_chk_ref_tag:#x}", "chk_app_tag": f"{r.dif_chk_app_tag:#x}",
                          "ins_ref_tag": f"{r.dif_ins_ref_tag:#x}", "ins_app_tag": f"{r.dif_ins_app_tag:#x}"}
        if self.entries:
            out["entries"] = [e.as_dict() for e in self.entries]
        out["raw"] = self.record.pack().hex()
        return out

    def __repr__(self) -> str:
        extra = ""
        if self.opcode in (Opcode.CRCGEN, Opcode.COPY_CRC):
            extra = f", crc={self.crc:#010x}"
        elif self.opcode in (Opcode.COMPARE, Opcode.COMPVAL, Opcode.CR_DELTA):
            extra = f", result={self.result}"
        tail = f", entries={len(self.entries)}" if self.entries else ""
        flag = ", timed_out=True" if self.timed_out else "" if self.accepted else ", accepted=False"
        return (f"Completion({self.opcode_name}, {self.status_name}, bytes_completed={self.bytes_completed:#x}, "
                f"fault_addr={self.fault_addr:#x}{extra}{tail}{flag})")


__all__ = ["ALIASES", "OPERATIONS", "Completion", "OpSpec", "build", "iova_of", "operation", "size_of"]
