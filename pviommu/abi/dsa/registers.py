"""Intel DSA capability and configuration registers: GENCAP, WQCAP, GRPCAP,
ENGCAP, OPCAP, WQCFG, GRPCFG, the command register and its status (Linux
``drivers/dma/idxd/registers.h``: ``union gen_cap_reg``, ``union wq_cap_reg``,
``union group_cap_reg``, ``union engine_cap_reg``, ``union wqcfg``,
``struct grpcfg``, ``enum idxd_cmd``, ``enum idxd_cmdsts_err``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

VERSION_1_0 = 0x100
VERSION_2_0 = 0x200


def _bits(value: int, lo: int, width: int) -> int:
    return (value >> lo) & ((1 << width) - 1)


@dataclass(frozen=True, slots=True)
class GenCap:
    """``union gen_cap_reg`` (BAR0 0x10)."""

    block_on_fault: bool = True
    overlap_copy: bool = True
    cache_control_mem: bool = True
    cache_control_cache: bool = True
    cmd_cap: bool = True
    dest_readback: bool = False
    drain_readback: bool = False
    max_xfer_shift: int = 21  # 2 MiB
    max_batch_shift: int = 5  # 32
    max_ims_mult: int = 0
    config_en: bool = True

    def encode(self) -> int:
        return (
            int(self.block_on_fault) | int(self.overlap_copy) << 1 | int(self.cache_control_mem) << 2
            | int(self.cache_control_cache) << 3 | int(self.cmd_cap) << 4
            | int(self.dest_readback) << 8 | int(self.drain_readback) << 9
            | (self.max_xfer_shift & 0x1F) << 16 | (self.max_batch_shift & 0xF) << 21
            | (self.max_ims_mult & 0x3F) << 25 | int(self.config_en) << 31
        )

    @classmethod
    def decode(cls, v: int) -> GenCap:
        return cls(bool(v & 1), bool(v & 2), bool(v & 4), bool(v & 8), bool(v & 16),
                   bool(v >> 8 & 1), bool(v >> 9 & 1), _bits(v, 16, 5), _bits(v, 21, 4),
                   _bits(v, 25, 6), bool(v >> 31 & 1))

    @property
    def max_xfer_size(self) -> int:
        return 1 << self.max_xfer_shift

    @property
    def max_batch_size(self) -> int:
        return 1 << self.max_batch_shift


@dataclass(frozen=True, slots=True)
class WqCap:
    """``union wq_cap_reg`` (BAR0 0x20)."""

    total_wq_size: int = 128
    num_wqs: int = 8
    wqcfg_size: int = 0  # 0: 32-byte WQCFG (1.0)
    shared_mode: bool = True
    dedicated_mode: bool = True
    wq_ats_support: bool = False
    priority: bool = True
    occupancy: bool = False

    def encode(self) -> int:
        return (
            (self.total_wq_size & 0xFFFF) | (self.num_wqs & 0xFF) << 16 | (self.wqcfg_size & 0xF) << 24
            | int(self.shared_mode) << 48 | int(self.dedicated_mode) << 49
            | int(self.wq_ats_support) << 50 | int(self.priority) << 51 | int(self.occupancy) << 52
        )

    @classmethod
    def decode(cls, v: int) -> WqCap:
        return cls(_bits(v, 0, 16), _bits(v, 16, 8), _bits(v, 24, 4), bool(v >> 48 & 1),
                   bool(v >> 49 & 1), bool(v >> 50 & 1), bool(v >> 51 & 1), bool(v >> 52 & 1))


def grpcap_encode(num_groups: int, total_rdbufs: int = 96) -> int:
    """``union group_cap_reg``: num_groups bits 0-7, total read buffers 8-15."""
    return (num_groups & 0xFF) | (total_rdbufs & 0xFF) << 8


def engcap_encode(num_engines: int) -> int:
    """``union engine_cap_reg``: num_engines bits 0-7."""
    return num_engines & 0xFF


def opcap_encode(opcodes: Iterable[int]) -> int:
    """OPCAP (256 bits): bit ``n`` set when opcode ``n`` is supported."""
    value = 0
    for op in opcodes:
        value |= 1 << int(op)
    return value


def opcap_words(opcap: int) -> tuple[int, int, int, int]:
    """The four u64 registers at 0x40, 0x48, 0x50, 0x58."""
    m = (1 << 64) - 1
    return (opcap & m, opcap >> 64 & m, opcap >> 128 & m, opcap >> 192 & m)


def opcap_has(opcap: int, opcode: int) -> bool:
    return bool(opcap >> opcode & 1)


class WqState(IntEnum):
    """``enum idxd_wq_hw_state`` (WQCFG bits 30-31 of dword 6)."""

    DISABLED = 0
    ENABLED = 1
    BUSY = 2


@dataclass(frozen=True, slots=True)
class WqCfg:
    """``union wqcfg`` (DSA 1.0, 32 bytes)."""

    wq_size: int = 0
    wq_thresh: int = 0
    dedicated: bool = True  # mode bit 0: 1 = dedicated
    bof: bool = False
    ats_disable: bool = False
    prs_disable: bool = False
    priority: int = 0
    pasid: int = 0
    pasid_en: bool = False
    priv: bool = False
    max_xfer_shift: int = 21
    max_batch_shift: int = 5
    occupancy: int = 0
    wq_state: WqState = WqState.DISABLED

    def pack(self) -> bytes:
        d2 = (int(self.dedicated) | int(self.bof) << 1 | int(self.ats_disable) << 2
              | int(self.prs_disable) << 3 | (self.priority & 0xF) << 4 | (self.pasid & 0xFFFFF) << 8
              | int(self.pasid_en) << 28 | int(self.priv) << 29)
        d3 = (self.max_xfer_shift & 0x1F) | (self.max_batch_shift & 0xF) << 5
        d6 = (self.occupancy & 0xFFFF) | (int(self.wq_state) & 3) << 30
        return struct.pack("<HHHHIIIIII", self.wq_size, 0, self.wq_thresh, 0, d2, d3, 0, 0, d6, 0)

    @classmethod
    def unpack(cls, data: bytes) -> WqCfg:
        size, _, thresh, _, d2, d3, _, _, d6, _ = struct.unpack("<HHHHIIIIII", data[:32])
        return cls(size, thresh, bool(d2 & 1), bool(d2 & 2), bool(d2 & 4), bool(d2 & 8),
                   _bits(d2, 4, 4), _bits(d2, 8, 20), bool(d2 >> 28 & 1), bool(d2 >> 29 & 1),
                   _bits(d3, 0, 5), _bits(d3, 5, 4), _bits(d6, 0, 16), WqState(_bits(d6, 30, 2)))


def grpcfg_pack(wqs: int, engines: int, flags: int = 0) -> bytes:
    """``struct grpcfg``: WQ bitmap 4 x u64, engine bitmap u64 @32, flags @40 (64 bytes)."""
    m = (1 << 64) - 1
    return struct.pack("<QQQQQQ16x", wqs & m, wqs >> 64 & m, wqs >> 128 & m, wqs >> 192 & m,
                       engines, flags)


class DeviceState(IntEnum):
    """GENSTS bits 0-1 (``enum idxd_device_status_state``)."""

    DISABLED = 0
    ENABLED = 1
    DRAIN = 2
    HALT = 3


class Cmd(IntEnum):
    """``enum idxd_cmd`` (CMD register bits 20-24)."""

    ENABLE_DEVICE = 1
    DISABLE_DEVICE = 2
    DRAIN_ALL = 3
    ABORT_ALL = 4
    RESET_DEVICE = 5
    ENABLE_WQ = 6
    DISABLE_WQ = 7
    DRAIN_WQ = 8
    ABORT_WQ = 9
    RESET_WQ = 10
    DRAIN_PASID = 11
    ABORT_PASID = 12
    REQUEST_INT_HANDLE = 13
    RELEASE_INT_HANDLE = 14


class CmdErr(IntEnum):
    """``enum idxd_cmdsts_err`` (CMDSTS bits 0-7)."""

    SUCCESS = 0
    INVAL_CMD = 1
    INVAL_WQIDX = 2
    HW_ERR = 3
    DEV_ENABLED = 0x10
    CONFIG = 0x11
    BUSMASTER_EN = 0x12
    PASID_INVAL = 0x13
    WQ_SIZE_ERANGE = 0x14
    GRP_CONFIG = 0x15
    GRP_CONFIG2 = 0x16
    GRP_CONFIG3 = 0x17
    GRP_CONFIG4 = 0x18
    DEV_NOTEN = 0x20
    WQ_ENABLED = 0x21
    WQ_SIZE = 0x22
    WQ_PRIOR = 0x23
    WQ_MODE = 0x24
    BOF_EN = 0x25
    PASID_EN = 0x26
    MAX_BATCH_SIZE = 0x27
    MAX_XFER_SIZE = 0x28
    DIS_DEV_EN = 0x31
    DEV_NOT_EN = 0x32  # registers.h IDXD_CMDSTS_ERR_DEV_NOT_EN (disable/drain/abort/reset WQ errors)
    WQ_NOT_EN = 0x32  # the earlier name here, kept as an alias
    INVAL_INT_IDX = 0x41
    NO_HANDLE = 0x42


CMDSTS_ACTIVE = 0x8000_0000


def cmd_encode(cmd: Cmd, operand: int = 0, int_req: bool = False) -> int:
    """CMD register: operand bits 0-19, command 20-24, request interrupt bit 31."""
    return (operand & 0xFFFFF) | (int(cmd) & 0x1F) << 20 | int(int_req) << 31


def cmdsts_encode(err: int, result: int = 0, active: bool = False) -> int:
    """CMDSTS: error bits 0-7, result 8-23, active bit 31."""
    return (err & 0xFF) | (result & 0xFFFF) << 8 | int(active) << 31
