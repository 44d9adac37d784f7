"""Completion interrupts over the wire: a descriptor with RCI makes the device
raise its MSI (int_handle), which reaches the owning guest as an event on the
device's interrupt stream -- and only callers holding the right credential
may listen."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from pvctl.local import VirtualSystem
from pviommu.abi.dsa import CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.client.local import LocalGuest
from pviommu.rpc.client import connect
from pviommu.v1 import common_pb2, dsa_pb2_grpc, guest_pb2

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]


@dataclass
class OneDevice:
    guest: LocalGuest
    dev: int
    address: str  # the device service's control address


@pytest.fixture
def one_device() -> Iterator[OneDevice]:
    """A local system of one guest with one DSA device."""
    with VirtualSystem(guests=1, devices_per_guest=1, memory_bytes=64 << 20) as system:
        g = system.guests[0]
        dev = g.devices[0]
        address = next(d.control_address for d in g.stub.ListDevices(common_pb2.Empty(), timeout=30).devices
                       if d.logical_device_id == dev)
        yield OneDevice(g, dev, address)


def test_rci_descriptor_delivers_its_interrupt_handle_to_the_guests_stream(one_device: OneDevice) -> None:
    g, dev, address = one_device.guest, one_device.dev, one_device.address
    channel = connect(address, g.token)
    events: queue.Queue[int] = queue.Queue()
    ended: list[grpc.StatusCode] = []  # how the stream ended, judged in the test thread
    stream = dsa_pb2_grpc.DsaDeviceStub(channel).StreamInterrupts(common_pb2.Empty())

    def listen() -> None:
        try:
            for irq in stream:
                events.put(irq.int_handle)
        except grpc.RpcError as exc:
            ended.append(exc.code())
        else:
            ended.append(grpc.StatusCode.OK)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        rec = g.stub.AllocBuffer(guest_pb2.AllocRequest(size=4096), timeout=30)
        rec_map = g.stub.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=rec.gpa, size=4096,
                                                  direction=guest_pb2.BIDIRECTIONAL), timeout=30)
        desc = Descriptor(opcode=Opcode.NOOP, flags=int(DescFlags.CRAV | DescFlags.RCR | DescFlags.RCI),
                          completion_addr=rec_map.iova, int_handle=3)
        reply = g.stub.SubmitDescriptor(guest_pb2.DescriptorRequest(
            logical_device_id=dev, descriptor=desc.pack(), wait=True, timeout_ms=10000,
            completion_gpa=rec.gpa), timeout=60)
        assert CompletionRecord.unpack(reply.completion_record).code == DsaStatus.SUCCESS
        assert events.get(timeout=10) == 3
        # an interrupt handle the device does not have is refused in the record, and raises nothing
        bad = Descriptor(opcode=Opcode.NOOP, flags=int(DescFlags.CRAV | DescFlags.RCR | DescFlags.RCI),
                         completion_addr=rec_map.iova, int_handle=200)
        reply = g.stub.SubmitDescriptor(guest_pb2.DescriptorRequest(
            logical_device_id=dev, descriptor=bad.pack(), wait=True, timeout_ms=10000,
            completion_gpa=rec.gpa), timeout=60)
        assert CompletionRecord.unpack(reply.completion_record).code == DsaStatus.INT_HANDLE_INVAL
        with pytest.raises(queue.Empty):
            events.get(timeout=1)
    finally:
        stream.cancel()
        listener.join(10)
        channel.close()
    # the stream ran until the test cancelled it (not ended by an error of its own)
    assert not listener.is_alive() and ended == [grpc.StatusCode.CANCELLED]
    # another credential may not listen to this device's interrupts
    stranger = connect(address, "not-a-partition-token")
    try:
        with pytest.raises(grpc.RpcError) as exc:
            next(iter(dsa_pb2_grpc.DsaDeviceStub(stranger).StreamInterrupts(common_pb2.Empty(), timeout=10)))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stranger.close()


def test_dmatest_waits_by_interrupt_by_default_and_raises_none_when_polled(one_device: OneDevice) -> None:
    """Default: every completion was waited for on the interrupt the descriptor
    asked for, the device raised one per descriptor and the guest received
    them. ``polled``: no completion waited on an interrupt and none was raised."""
    from pvctl.local import run_dmatest_stream

    g, address = one_device.guest, one_device.address
    channel = connect(address, g.token)
    device = dsa_pb2_grpc.DsaDeviceStub(channel)

    def interrupts() -> int:
        return int(device.GetCounters(common_pb2.Empty(), timeout=30).counters["interrupts"])

    def received() -> int:
        return int(g.stub.GetStats(common_pb2.Empty(), timeout=30).counters["dsa_interrupts"])

    try:
        raised, got = interrupts(), received()
        r = run_dmatest_stream(g.stub, guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=1,
                                                               iterations=40, timeout=3000), timeout=120)
        assert r.failures == 0 and r.tests == 40
        assert (r.completions_by_interrupt, r.completions_polled) == (40, 0)
        assert [(t.completions_by_interrupt, t.completions_polled) for t in r.threads] == [(40, 0)]
        assert interrupts() - raised == 40
        # the last interrupts may still be on their way to the guest when the run ends
        deadline = time.monotonic() + 30
        while received() - got < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received() - got == 40
        raised, got = interrupts(), received()
        r = run_dmatest_stream(g.stub, guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=1,
                                                               iterations=40, timeout=3000, polled=True),
                               timeout=120)
        assert r.failures == 0 and r.tests == 40
        assert (r.completions_by_interrupt, r.completions_polled) == (0, 40)
        assert interrupts() == raised and received() == got
    finally:
        channel.close()
