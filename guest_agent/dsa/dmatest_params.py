"""dmatest's parameters, per-thread results and outcome, and its channel filter: what the
gRPC servicer and the agent build and read, apart from the run itself (dmatest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from guest_agent.driver.pviommu import DeviceState
from guest_agent.dsa.dmatest_format import kbs, persec


def chan_name(index: int) -> str:
    """The dmaengine channel name of DSA device ``index`` (as ``DsaDriver.chan_name``)."""
    return f"dma{index}chan0"


@dataclass
class DmatestParams:
    """The module parameters (names and defaults kept), then pviommu's own."""

    test_buf_size: int = 16384
    channel: str = ""
    device: str = ""
    threads_per_chan: int = 1
    max_channels: int = 0
    iterations: int = 0  # 0 = until stopped
    timeout: int = 3000  # ms, negative = infinite, 0 = no wait
    noverify: bool = False
    norandom: bool = False
    verbose: bool = False
    alignment: int = -1
    transfer_size: int = 0
    polled: bool = False
    design: str = "nested"  # pviommu: "nested" | "baseline"
    seed: int = 0  # pviommu
    duration_s: float = 0.0  # pviommu: also stop each thread after this long


@dataclass
class ThreadResult:
    name: str
    tests: int = 0
    failures: int = 0
    runtime_us: int = 0
    total_len: int = 0
    status: int = 0
    #: completions waited for on the device's interrupt (RCI asked, the wait woken by interrupts)
    by_interrupt: int = 0
    #: completions waited for by polling the record alone (``polled``, or no interrupt line)
    polled: int = 0

    @property
    def iops_fixpt(self) -> int:
        return persec(self.runtime_us, self.tests)

    @property
    def kbs(self) -> int:
        return kbs(self.runtime_us, self.total_len)


@dataclass
class DmatestOutcome:
    threads: list[ThreadResult]
    lines: list[str]
    summary: str  # aggregate_line: a pviommu addition
    runtime_s: float
    tests: int = 0
    failures: int = 0
    iops: float = 0.0
    kb_per_s: float = 0.0
    by_interrupt: int = 0
    polled: int = 0


def select_devices(devices: list[DeviceState], params: DmatestParams) -> list[DeviceState]:
    """dmatest's channel filter (``channel`` and ``device`` names, "" = any), then ``max_channels``."""
    out = [d for d in devices if (not params.channel or chan_name(d.index) == params.channel)
           and (not params.device or d.name == params.device)]
    return out[:params.max_channels] if params.max_channels else out
