"""WQ sizes never exceed the device's total (WQCAP), whatever order a driver
configures, enables and disables in: WQCFG writes, ENABLE_DEVICE and
ENABLE_WQ each check it, including while the device is enabled, and answer
with the DSA codes (WQ_SIZE_ERANGE, WQ_SIZE). A hypothesis state machine
drives a real ``DsaDevice`` against a small model of those rules."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dma_device.dsa import DsaDevice, DsaDeviceConfig
from dma_device.dsa.device import DsaConfigError
from pviommu.abi.dsa import Cmd, CmdErr, DeviceState, WqCfg, WqState

TOTAL, NUM_WQS = 16, 4
WQ = st.integers(0, NUM_WQS - 1)
SIZE = st.integers(0, TOTAL + 8)


class WqSizeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dev = DsaDevice(None, DsaDeviceConfig(num_wqs=NUM_WQS, total_wq_size=TOTAL, num_groups=1,
                                                   num_engines=1, num_int_handles=NUM_WQS + 1))
        self._group()
        self.sizes = [0] * NUM_WQS
        self.thresh = [0] * NUM_WQS
        self.enabled = [False] * NUM_WQS
        self.device_on = False

    def _group(self) -> None:
        self.dev.configure_group(0, range(NUM_WQS), [0])

    def _cmd(self, cmd: Cmd, operand: int = 0) -> int:
        return self.dev.command(cmd, operand) & 0xFF

    def _others(self, wq: int) -> int:
        return sum(s for i, s in enumerate(self.sizes) if i != wq)

    @rule(wq=WQ, size=SIZE, data=st.data())
    def configure(self, wq: int, size: int, data: st.DataObject) -> None:
        thresh = data.draw(st.integers(0, size + 1))
        try:
            self.dev.configure_wq(wq, WqCfg(wq_size=size, wq_thresh=thresh))
        except DsaConfigError as exc:
            refused: CmdErr | None = exc.cmd_err
        else:
            refused = None
        if self.enabled[wq]:
            assert refused is not None and refused != CmdErr.WQ_SIZE_ERANGE  # read-only, not a size problem
        elif size > TOTAL or (self.device_on and size + self._others(wq) > TOTAL):
            assert refused == CmdErr.WQ_SIZE_ERANGE
        else:
            assert refused is None
            self.sizes[wq], self.thresh[wq] = size, thresh

    @rule()
    def enable_device(self) -> None:
        err = self._cmd(Cmd.ENABLE_DEVICE)
        if self.device_on:
            assert err == CmdErr.DEV_ENABLED
        elif sum(self.sizes) > TOTAL:
            assert err == CmdErr.WQ_SIZE_ERANGE
        else:
            assert err == CmdErr.SUCCESS
            self.device_on = True

    @rule()
    def disable_device(self) -> None:
        err = self._cmd(Cmd.DISABLE_DEVICE)
        assert err == (CmdErr.SUCCESS if self.device_on else CmdErr.DIS_DEV_EN)
        self.device_on = False
        self.enabled = [False] * NUM_WQS

    @rule(wq=WQ)
    def enable_wq(self, wq: int) -> None:
        err = self._cmd(Cmd.ENABLE_WQ, wq)
        size = self.sizes[wq]
        if not self.device_on:
            assert err == CmdErr.DEV_NOTEN
        elif self.enabled[wq]:
            assert err == CmdErr.WQ_ENABLED
        elif size == 0 or self.thresh[wq] > size or size + self._others(wq) > TOTAL:
            assert err == CmdErr.WQ_SIZE
        else:
            assert err == CmdErr.SUCCESS
            self.enabled[wq] = True

    @rule(wq=WQ)
    def disable_wq(self, wq: int) -> None:
        err = self._cmd(Cmd.DISABLE_WQ, wq)
        assert err == (CmdErr.SUCCESS if self.enabled[wq] else CmdErr.WQ_NOT_EN)
        self.enabled[wq] = False

    @rule(wq=WQ)
    def reset_wq(self, wq: int) -> None:
        assert self._cmd(Cmd.RESET_WQ, wq) == CmdErr.SUCCESS
        self.enabled[wq], self.sizes[wq], self.thresh[wq] = False, 0, 0

    @rule()
    def reset_device(self) -> None:
        assert self._cmd(Cmd.RESET_DEVICE) == CmdErr.SUCCESS
        self._group()
        self.device_on = False
        self.sizes, self.thresh, self.enabled = [0] * NUM_WQS, [0] * NUM_WQS, [False] * NUM_WQS

    @invariant()
    def registers_match_and_an_enabled_device_never_exceeds_wqcap(self) -> None:
        cfgs = [self.dev.wqcfg(w) for w in range(NUM_WQS)]
        assert [c.wq_size for c in cfgs] == self.sizes
        assert [c.wq_state == WqState.ENABLED for c in cfgs] == self.enabled
        assert (self.dev.gensts == DeviceState.ENABLED) == self.device_on
        if self.device_on:
            assert sum(c.wq_size for c in cfgs) <= TOTAL
        assert sum(c.wq_size for c, on in zip(cfgs, self.enabled, strict=True) if on) <= TOTAL

    def teardown(self) -> None:
        self.dev.close()


TestWqSizesAgainstWqcap = WqSizeMachine.TestCase
TestWqSizesAgainstWqcap.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_disabled_wq_cannot_grow_past_wqcap_while_the_device_is_enabled() -> None:
    dev = DsaDevice(None, DsaDeviceConfig(num_wqs=2, total_wq_size=16, num_groups=1, num_engines=1))
    try:
        dev.configure_group(0, [0, 1], [0])
        dev.configure_wq(0, WqCfg(wq_size=10))
        dev.configure_wq(1, WqCfg(wq_size=6))
        assert dev.command(Cmd.ENABLE_DEVICE) & 0xFF == CmdErr.SUCCESS
        assert dev.command(Cmd.ENABLE_WQ, 1) & 0xFF == CmdErr.SUCCESS
        with pytest.raises(DsaConfigError) as exc:
            dev.configure_wq(0, WqCfg(wq_size=11))
        assert exc.value.cmd_err == CmdErr.WQ_SIZE_ERANGE and "16" in str(exc.value)
        assert dev.wqcfg(0).wq_size == 10  # the refused write changed nothing
        dev.configure_wq(0, WqCfg(wq_size=9))  # shrinking fits
        assert dev.command(Cmd.ENABLE_WQ, 0) & 0xFF == CmdErr.SUCCESS
    finally:
        dev.close()
