"""dmatest's arithmetic, patterns and messages, word for word (dmatest.c)."""

from __future__ import annotations

from guest_agent.driver.pviommu import DeviceState
from guest_agent.dsa.dmatest import (
    PATTERN_COPY,
    PATTERN_DST,
    PATTERN_SRC,
    DmatestParams,
    Patterns,
    aggregate_line,
    chan_name,
    kbs,
    mismatch_line,
    persec,
    result_line,
    select_devices,
    summary_line,
    verify,
)
from guest_agent.dsa.driver import DsaDriver


def test_summary_line_uses_8_bit_fixed_point_iops_and_kb_per_second() -> None:
    assert summary_line("dma0chan0-copy0", 100, 1, 1_000_000, 100 * 1024) == \
        "dma0chan0-copy0: summary 100 tests, 1 failures 100.00 iops 100 KB/s (0)"
    assert persec(3_000_000, 1) == (1_000_000 << 8) // 3_000_000  # 0.33 iops
    assert summary_line("t", 1, 0, 3_000_000, 0).endswith("0.33 iops 0 KB/s (0)")
    assert persec(0, 10) == 0 and kbs(0, 1 << 20) == 0


def test_result_line_matches_dmatest() -> None:
    assert result_line("dma0chan0-copy1", 7, "data error", 0x10, 0x20, 0x30, 3) == \
        "dmatest: dma0chan0-copy1: result #7: 'data error' with src_off=0x10 dst_off=0x20 len=0x30 (3)"


def test_patterns_carry_the_inverted_counter() -> None:
    p = Patterns(64)
    img = p.src_image(4, 8)
    assert img[0] == PATTERN_SRC | 0x1F and img[4] == PATTERN_SRC | PATTERN_COPY | (~4 & 0x1F)
    assert p.dst_image(0, 1)[0] == PATTERN_DST | 0x20 | 0x1F
    assert p.dst_expected(4, 0, 8)[:8] == img[4:12]


def test_mismatch_messages_classify_like_dmatest() -> None:
    expected = "dmatest: t: srcbuf[0x5] overwritten! Expected 9a, got 00"
    assert mismatch_line(0x00, PATTERN_SRC, 5, 5, True, "t") == expected
    assert "not copied!" in mismatch_line(PATTERN_DST | 0x20, PATTERN_SRC | PATTERN_COPY, 0, 0, False, "t")
    assert "was copied!" in mismatch_line(PATTERN_SRC | PATTERN_COPY, PATTERN_DST, 0, 0, False, "t")
    assert "mismatch!" in mismatch_line(PATTERN_DST | 0x01, PATTERN_DST, 0, 0, False, "t")


def test_verify_prints_at_most_32_lines_then_suppresses() -> None:
    lines: list[str] = []
    errors = verify(bytes(100), 0, 100, 0, PATTERN_SRC, True, "t", lines.append)
    assert errors == 100 and len(lines) == 33 and lines[-1] == "dmatest: t: 68 errors suppressed"


def test_result_line_prints_a_negative_value_signed_as_dmatest_does_for_error_values() -> None:
    assert result_line("dma0chan0-copy0", 2, "src mapping error", 0, 0x10, 0x20, -12) == \
        "dmatest: dma0chan0-copy0: result #2: 'src mapping error' with src_off=0x0 dst_off=0x10 len=0x20 (-12)"


def test_summary_line_carries_the_thread_return_value() -> None:
    assert summary_line("dma0chan0-copy0", 0, 0, 0, 0, -12) == \
        "dma0chan0-copy0: summary 0 tests, 0 failures 0.00 iops 0 KB/s (-12)"


def test_the_aggregate_line_is_labelled_as_not_dmatest_and_cannot_be_taken_for_a_summary() -> None:
    line = aggregate_line(2, 200, 1, 1_000_000, 200 * 1024)
    assert line == "pviommu aggregate of 2 threads (not a dmatest line): 200 tests, 1 failures 200.00 iops 200 KB/s"
    assert not line.startswith("dmatest") and ": summary " not in line
    assert aggregate_line(1, 1, 0, 1_000_000, 0).startswith("pviommu aggregate of 1 thread (")


def test_channel_names_are_the_drivers_dmaengine_names() -> None:
    drv = DsaDriver(1, "dsa0", "127.0.0.1:1", "t", None, index=3)  # type: ignore[arg-type]
    assert chan_name(3) == drv.chan_name == "dma3chan0"


def _dev(index: int, name: str) -> DeviceState:
    return DeviceState(logical_device_id=100 + index, name=name, control_address="", index=index)


def test_select_devices_filters_by_channel_and_device_then_takes_max_channels() -> None:
    devs = [_dev(0, "a"), _dev(1, "b"), _dev(2, "c")]
    pick = lambda **kw: [d.name for d in select_devices(devs, DmatestParams(**kw))]  # noqa: E731
    assert pick() == ["a", "b", "c"]
    assert pick(channel="dma1chan0") == ["b"]
    assert pick(device="c") == ["c"]
    assert pick(channel="dma1chan0", device="c") == []
    assert pick(max_channels=2) == ["a", "b"]
    assert pick(channel="dma9chan0") == []
