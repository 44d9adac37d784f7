"""dmatest.c's arithmetic, patterns and messages, word for word (pure functions).

``persec``/``kbs`` are dmatest_persec/dmatest_KBs (8-bit fixed point),
``result_line``/``summary_line``/``mismatch_line`` its pr_info/pr_warn
formats, ``Patterns``/``verify`` its buffer patterns and dmatest_verify.
``aggregate_line`` is pviommu's total over every thread, labelled as not a
dmatest line.
"""

from __future__ import annotations

from collections.abc import Callable

PATTERN_SRC = 0x80
PATTERN_DST = 0x00
PATTERN_COPY = 0x40
PATTERN_OVERWRITE = 0x20
PATTERN_COUNT_MASK = 0x1F
MAX_ERROR_COUNT = 32
FIXPT_SHIFT = 8
UINT_MAX = 0xFFFF_FFFF


def persec(runtime_us: int, val: int) -> int:
    """``dmatest_persec``: val per second in 8-bit fixed point."""
    per_sec = 1_000_000
    if runtime_us <= 0:
        return 0
    while runtime_us > UINT_MAX:  # drop precision until runtime is 32 bits
        runtime_us >>= 1
        per_sec <<= 1
    per_sec *= val
    return (per_sec << FIXPT_SHIFT) // runtime_us


def kbs(runtime_us: int, total_len: int) -> int:
    """``dmatest_KBs``."""
    return persec(runtime_us, total_len >> 10) >> FIXPT_SHIFT


def _rate(tests: int, failures: int, runtime_us: int, total_len: int) -> str:
    iops = persec(runtime_us, tests)
    frac = ((iops & 0xFF) * 100) >> FIXPT_SHIFT
    return (f"{tests} tests, {failures} failures {iops >> FIXPT_SHIFT}.{frac:02d} iops "
            f"{kbs(runtime_us, total_len)} KB/s")


def summary_line(name: str, tests: int, failures: int, runtime_us: int, total_len: int, ret: int = 0) -> str:
    """A thread's summary, without the ``dmatest: `` prefix."""
    return f"{name}: summary {_rate(tests, failures, runtime_us, total_len)} ({ret})"


def aggregate_line(threads: int, tests: int, failures: int, runtime_us: int, total_len: int) -> str:
    """pviommu's total over every thread (tests / the longest thread runtime): not a dmatest.c line."""
    return (f"pviommu aggregate of {threads} thread{'' if threads == 1 else 's'} (not a dmatest line): "
            f"{_rate(tests, failures, runtime_us, total_len)}")


def result_line(name: str, n: int, err: str, src_off: int, dst_off: int, length: int, data: int) -> str:
    """dmatest's ``result()`` (``%ld`` for a negative value, as IS_ERR_VALUE selects)."""
    return (f"dmatest: {name}: result #{n}: '{err}' with src_off=0x{src_off:x} dst_off=0x{dst_off:x} "
            f"len=0x{length:x} ({data})")


# -- patterns -----------------------------------------------------------------------------------
class Patterns:
    """The counter patterns of one buffer size, precomputed as byte strings
    (byte i = base | (~i & 0x1f)) so fill and verify run at memcpy speed."""

    def __init__(self, buf_size: int) -> None:
        ctr = bytes((~i) & PATTERN_COUNT_MASK for i in range(buf_size))
        self.src = ctr.translate(bytes((b | PATTERN_SRC) & 0xFF for b in range(256)))
        self.src_copy = ctr.translate(bytes((b | PATTERN_SRC | PATTERN_COPY) & 0xFF for b in range(256)))
        self.dst = ctr.translate(bytes((b | PATTERN_DST) & 0xFF for b in range(256)))
        self.dst_over = ctr.translate(bytes((b | PATTERN_DST | PATTERN_OVERWRITE) & 0xFF for b in range(256)))

    def src_image(self, off: int, length: int) -> bytes:
        return self.src[:off] + self.src_copy[off:off + length] + self.src[off + length:]

    def dst_image(self, off: int, length: int) -> bytes:
        return self.dst[:off] + self.dst_over[off:off + length] + self.dst[off + length:]

    def dst_expected(self, src_off: int, dst_off: int, length: int) -> bytes:
        return self.dst[:dst_off] + self.src_copy[src_off:src_off + length] + self.dst[dst_off + length:]


def verify(buf: bytes, start: int, end: int, counter: int, pattern: int, is_srcbuf: bool,
           thread: str, emit: Callable[[str], None]) -> int:
    """``dmatest_verify`` over ``buf[start:end]`` with its mismatch messages."""
    errors = 0
    for i in range(start, end):
        actual = buf[i]
        expected = pattern | ((~counter) & PATTERN_COUNT_MASK)
        if actual != expected:
            if errors < MAX_ERROR_COUNT:
                emit(mismatch_line(actual, pattern, i, counter, is_srcbuf, thread))
            errors += 1
        counter += 1
    if errors > MAX_ERROR_COUNT:
        emit(f"dmatest: {thread}: {errors - MAX_ERROR_COUNT} errors suppressed")
    return errors


def mismatch_line(actual: int, pattern: int, index: int, counter: int, is_srcbuf: bool, thread: str) -> str:
    """``dmatest_mismatch``."""
    diff = actual ^ pattern
    expected = pattern | ((~counter) & PATTERN_COUNT_MASK)
    if is_srcbuf:
        what = f"srcbuf[0x{index:x}] overwritten!"
    elif pattern & PATTERN_COPY and diff & (PATTERN_COPY | PATTERN_OVERWRITE):
        what = f"dstbuf[0x{index:x}] not copied!"
    elif diff & PATTERN_SRC:
        what = f"dstbuf[0x{index:x}] was copied!"
    else:
        what = f"dstbuf[0x{index:x}] mismatch!"
    return f"dmatest: {thread}: {what} Expected {expected:02x}, got {actual:02x}"
