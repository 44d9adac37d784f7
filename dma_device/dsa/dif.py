"""T10 DIF protection information as the DSA handles it.

Each block of 512/520/4096/4104 data bytes (DIF flags bits 1:0) is followed by
an 8-byte tuple: guard (CRC-16 T10-DIF of the block) big-endian u16, application
tag big-endian u16, reference tag big-endian u32. The reference tag increments
per block unless "fixed"; the application tag is fixed unless "incrementing".

Flag values (checked against Intel DML include/dml/dmldefs.h
DML_DIF_FLAG_* and specific_flags.hpp dif_source_flag/dif_destination_flag):
DIF flags bits 1:0 block size, 0x04 invert CRC seed (guard starts at 0xFFFF),
0x08 invert CRC result; source flags 0x01 all-F detect error enable, 0x02
all-F detect, 0x04 application-tag F detect, 0x08 application+reference-tag
F detect, 0x10 incrementing application tag, 0x20 guard check disable, 0x40
reference check disable, 0x80 fixed reference tag; destination flags 0x08
application-tag pass-through, 0x10 incrementing application tag, 0x20 guard
pass-through, 0x40 reference pass-through, 0x80 fixed reference tag (bits
0-2 reserved).

Meanings, and where they were checked:
* application-tag F detect skips every check of a block whose application
  tag is 0xFFFF, application+reference F detect of a block whose tags are
  0xFFFF/0xFFFFFFFF (SPDK lib/idxd idxd_get_source_dif_flags: "all DIF checks
  are disabled when ..."; DML dml_dif.c does the same);
* application tag mask: a 1 bit is not compared, 0xFFFF disables the
  application tag check (SPDK idxd_get_app_tag_mask). DML's software path
  reads the mask inverted; SPDK, which drives the hardware, is followed;
* all-F detect: with the error bit, a block whose 8 tuple bytes are all 0xFF
  fails with DIF status 0x08 (DML); without it the block is skipped like the
  other F detects (inf: DML's software path then checks the block as usual);
* the insert/update application tag mask is reported in the completion
  record but not applied to the generated tag (inf: DML's software path
  writes ``seed & ~mask``; no hardware-facing source was found).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dma_device.dsa.crc import crc16_t10dif
from pviommu.abi.dsa import (
    DIF_BLOCK_SIZES,
    DIF_DST_APP_PASS,
    DIF_DST_FIXED_REF_TAG,
    DIF_DST_GUARD_PASS,
    DIF_DST_INC_APP_TAG,
    DIF_DST_REF_PASS,
    DIF_FLAG_INVERT_CRC_RESULT,
    DIF_FLAG_INVERT_CRC_SEED,
    DIF_SRC_ALL_F_DETECT,
    DIF_SRC_ALL_F_DETECT_ERR,
    DIF_SRC_APP_F_DETECT,
    DIF_SRC_APP_REF_F_DETECT,
    DIF_SRC_FIXED_REF_TAG,
    DIF_SRC_GUARD_CHECK_DISABLE,
    DIF_SRC_INC_APP_TAG,
    DIF_SRC_REF_CHECK_DISABLE,
    DIF_STATUS_ALL_F,
    DIF_STATUS_APP,
    DIF_STATUS_GUARD,
    DIF_STATUS_REF,
    DIF_TUPLE_SIZE,
)

_TUPLE = struct.Struct(">HHI")
#: DIF flags bits 4-7 have no meaning in DSA 1.0: reserved.
DIF_FLAGS_RESERVED = 0xF0


@dataclass(frozen=True, slots=True)
class Tags:
    """Seed tags of one side (source check or destination insert)."""

    ref: int
    app_mask: int
    app: int


def block_size(dif_flags: int) -> int:
    return DIF_BLOCK_SIZES[dif_flags & 3]


def guard(block: bytes | memoryview, dif_flags: int) -> int:
    return crc16_t10dif(block, bool(dif_flags & DIF_FLAG_INVERT_CRC_SEED),
                        bool(dif_flags & DIF_FLAG_INVERT_CRC_RESULT))


def tuple_bytes(guard_tag: int, app: int, ref: int) -> bytes:
    return _TUPLE.pack(guard_tag & 0xFFFF, app & 0xFFFF, ref & 0xFFFFFFFF)


def expected_src(tags: Tags, src_flags: int, i: int) -> tuple[int, int]:
    """(ref, app) the source tuple of block ``i`` must carry."""
    ref = tags.ref if src_flags & DIF_SRC_FIXED_REF_TAG else (tags.ref + i) & 0xFFFFFFFF
    app = (tags.app + i) & 0xFFFF if src_flags & DIF_SRC_INC_APP_TAG else tags.app
    return ref, app


def dest_tags(tags: Tags, dest_flags: int, i: int) -> tuple[int, int]:
    """(ref, app) generated for destination block ``i``."""
    ref = tags.ref if dest_flags & DIF_DST_FIXED_REF_TAG else (tags.ref + i) & 0xFFFFFFFF
    app = (tags.app + i) & 0xFFFF if dest_flags & DIF_DST_INC_APP_TAG else tags.app
    return ref, app


def check_block(data: bytes | memoryview, tup: bytes | memoryview, dif_flags: int, src_flags: int,
                tags: Tags, i: int) -> int:
    """DIF status bits for source block ``i`` (0 = good or skipped by F detect)."""
    g, app, ref = _TUPLE.unpack(bytes(tup))
    if src_flags & DIF_SRC_ALL_F_DETECT and g == 0xFFFF and app == 0xFFFF and ref == 0xFFFFFFFF:
        return DIF_STATUS_ALL_F if src_flags & DIF_SRC_ALL_F_DETECT_ERR else 0
    if src_flags & DIF_SRC_APP_F_DETECT and app == 0xFFFF:
        return 0
    if src_flags & DIF_SRC_APP_REF_F_DETECT and app == 0xFFFF and ref == 0xFFFFFFFF:
        return 0
    exp_ref, exp_app = expected_src(tags, src_flags, i)
    status = 0
    if not src_flags & DIF_SRC_GUARD_CHECK_DISABLE and g != guard(data, dif_flags):
        status |= DIF_STATUS_GUARD
    if (app ^ exp_app) & ~tags.app_mask & 0xFFFF:
        status |= DIF_STATUS_APP
    if not src_flags & DIF_SRC_REF_CHECK_DISABLE and ref != exp_ref:
        status |= DIF_STATUS_REF
    return status


def updated_tuple(data: bytes | memoryview, src_tup: bytes | memoryview, dif_flags: int,
                  dest_flags: int, tags: Tags, i: int) -> bytes:
    """Destination tuple of DIF_UPDT for block ``i`` (pass-through or regenerated)."""
    sg, sapp, sref = _TUPLE.unpack(bytes(src_tup))
    ref, app = dest_tags(tags, dest_flags, i)
    g = sg if dest_flags & DIF_DST_GUARD_PASS else guard(data, dif_flags)
    if dest_flags & DIF_DST_APP_PASS:
        app = sapp
    if dest_flags & DIF_DST_REF_PASS:
        ref = sref
    return tuple_bytes(g, app, ref)


assert _TUPLE.size == DIF_TUPLE_SIZE
