"""The ``pviommu.v1.GuestAgent`` service: glue between gRPC and ``Agent``.

Each method requires the partition credential, decodes, calls the agent and
encodes. Errors are ``PviommuError``s that escape to the ``grpc_errors``
decorators (the one error -> gRPC mapping, HV status in the details); a
refused hypercall therefore reaches the script as a clear error and the agent
keeps serving.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator

import grpc

from guest_agent.agent import Agent
from guest_agent.dma.api import Direction
from guest_agent.driver.domain import Domain, describe
from guest_agent.dsa.dmatest import Dmatest, DmatestOutcome, DmatestParams
from guest_agent.dsa.driver import status_name
from pviommu.abi.hv import IommuCap
from pviommu.log import get_logger
from pviommu.rpc.auth import require
from pviommu.rpc.feeds import AsyncFeed
from pviommu.rpc.status import grpc_errors, grpc_stream_errors
from pviommu.v1 import common_pb2, guest_pb2, guest_pb2_grpc, hypervisor_pb2

log = get_logger("guest.rpc")


def domain_message(d: Domain) -> guest_pb2.AgentDomain:
    info = describe(d)
    return guest_pb2.AgentDomain(domain_id=info["domain_id"], kind=info["kind"], devices=info["devices"],
                                 root_gpa=info["root_gpa"], mapped_bytes=max(0, info["mapped_bytes"]),
                                 table_pages=info["table_pages"])


def dmatest_params(p: guest_pb2.DmatestParams) -> DmatestParams:
    """The optional fields take dmatest's default only when unset, so timeout=0 (no wait),
    test_buf_size=0 or threads_per_chan=0 keep the meaning they have in dmatest."""
    d = DmatestParams()
    return DmatestParams(
        test_buf_size=p.test_buf_size if p.HasField("test_buf_size") else d.test_buf_size,
        channel=p.channel, device=p.device,
        threads_per_chan=p.threads_per_chan if p.HasField("threads_per_chan") else d.threads_per_chan,
        max_channels=p.max_channels, iterations=p.iterations,
        timeout=p.timeout if p.HasField("timeout") else d.timeout, noverify=p.noverify, norandom=p.norandom,
        verbose=p.verbose, alignment=p.alignment if p.HasField("alignment") else d.alignment,
        transfer_size=p.transfer_size, polled=p.polled, design=p.design or d.design, seed=p.seed,
        duration_s=p.duration_s)


def dmatest_result(o: DmatestOutcome) -> guest_pb2.DmatestResult:
    return guest_pb2.DmatestResult(
        tests=o.tests, failures=o.failures, iops=o.iops, kb_per_s=o.kb_per_s, lines=o.lines, summary=o.summary,
        runtime_s=o.runtime_s, completions_by_interrupt=o.by_interrupt, completions_polled=o.polled,
        threads=[guest_pb2.DmatestThreadResult(thread=t.name, tests=t.tests, failures=t.failures,
                                               iops=t.iops_fixpt / 256, kb_per_s=float(t.kbs), status=t.status,
                                               completions_by_interrupt=t.by_interrupt,
                                               completions_polled=t.polled)
                 for t in o.threads])


class _Run:
    """A dmatest run in progress, for StopDmatest (which may come before its threads start)."""

    def __init__(self) -> None:
        self.test: Dmatest | None = None
        self.stop_requested = False


class GuestAgentServicer(guest_pb2_grpc.GuestAgentServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._runs: dict[int, _Run] = {}
        self._runs_lock = threading.Lock()
        self._run_ids = itertools.count(1)

    @staticmethod
    def _auth() -> None:
        require("partition")

    # -- inventory ---------------------------------------------------------------------
    @grpc_errors
    def GetIommuInfo(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> guest_pb2.IommuInfo:
        self._auth()
        g = self.agent.iommu.geometry
        info = guest_pb2.IommuInfo(present=g is not None, ram_bytes=self.agent.ram.size,
                                   partition_id=self.agent.partition_id, revision=self.agent.iommu.revision.value)
        if g is not None:
            info.iommu_cap, info.max_iova_width, info.iova_width = g.iommu_cap, g.max_iova_width, g.iova_width
            info.pgsize_bitmap, info.five_level = g.pgsize_bitmap, bool(g.iommu_cap & IommuCap.S1_5LVL) and \
                g.five_level
        return info

    @grpc_errors
    def ListDevices(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> guest_pb2.AgentDevices:
        self._auth()
        self.agent.iommu.rescan()
        out = guest_pb2.AgentDevices()
        for d in sorted(self.agent.iommu.devices.values(), key=lambda d: d.index):
            dom = d.domain
            out.devices.append(guest_pb2.AgentDevice(
                logical_device_id=d.logical_device_id, name=d.name, control_address=d.control_address,
                behind_pviommu=d.behind_pviommu, domain_id=dom.domain_id if dom else 0,
                domain_kind=dom.kind.value if dom else "blocked"))
        return out

    @grpc_errors
    def ListDomains(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> guest_pb2.AgentDomains:
        self._auth()
        doms = sorted(self.agent.iommu.domains.values(), key=lambda d: d.domain_id)
        return guest_pb2.AgentDomains(domains=[domain_message(d) for d in doms])

    # -- memory ------------------------------------------------------------------------
    @grpc_errors
    def AllocBuffer(self, request: guest_pb2.AllocRequest, context: grpc.ServicerContext) -> guest_pb2.Buffer:
        self._auth()
        gpa, size = self.agent.alloc_buffer(request.size)
        return guest_pb2.Buffer(gpa=gpa, size=size)

    @grpc_errors
    def FreeBuffer(self, request: guest_pb2.Buffer, context: grpc.ServicerContext) -> common_pb2.Empty:
        self._auth()
        self.agent.free_buffer(request.gpa)
        return common_pb2.Empty()

    @grpc_errors
    def ReadMemory(self, request: guest_pb2.ReadRequest, context: grpc.ServicerContext) -> guest_pb2.Bytes:
        self._auth()
        return guest_pb2.Bytes(data=self.agent.memory.read(request.gpa, request.size))

    @grpc_errors
    def WriteMemory(self, request: guest_pb2.WriteRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self._auth()
        self.agent.memory.write(request.gpa, bytes(request.data))
        return common_pb2.Empty()

    # -- mappings -----------------------------------------------------------------------
    @grpc_errors
    def Map(self, request: guest_pb2.MapRequest, context: grpc.ServicerContext) -> guest_pb2.MapReply:
        self._auth()
        m = self.agent.map(request.logical_device_id, request.domain_id, request.gpa, request.size,
                           Direction(request.direction), request.iova, on_demand=request.on_demand)
        return guest_pb2.MapReply(iova=m.dma_addr, size=m.size)

    @grpc_errors
    def Unmap(self, request: guest_pb2.UnmapRequest, context: grpc.ServicerContext) -> guest_pb2.UnmapReply:
        self._auth()
        r = self.agent.unmap(request.logical_device_id, request.domain_id, request.iova, request.size,
                             request.skip_flush)
        return guest_pb2.UnmapReply(unmapped=r.unmapped, flushed=r.flushed)

    @grpc_errors
    def Flush(self, request: guest_pb2.FlushRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self._auth()
        self.agent.flush(request.logical_device_id, request.domain_id)
        return common_pb2.Empty()

    # -- domains -------------------------------------------------------------------------
    @grpc_errors
    def CreateDomain(self, request: guest_pb2.CreateDomainRequest,
                     context: grpc.ServicerContext,
                     ) -> guest_pb2.AgentDomain:
        self._auth()
        return domain_message(self.agent.create_domain(request.kind))

    @grpc_errors
    def DeleteDomain(self, request: guest_pb2.DomainRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self._auth()
        self.agent.delete_domain(request.domain_id)
        return common_pb2.Empty()

    @grpc_errors
    def AttachDevice(self, request: guest_pb2.AttachRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self._auth()
        self.agent.attach(request.domain_id, request.logical_device_id)
        return common_pb2.Empty()

    @grpc_errors
    def DetachDevice(self, request: guest_pb2.DeviceRef, context: grpc.ServicerContext) -> common_pb2.Empty:
        self._auth()
        self.agent.detach(request.logical_device_id)
        return common_pb2.Empty()

    # -- device work ---------------------------------------------------------------------
    @grpc_errors
    def SubmitDescriptor(self, request: guest_pb2.DescriptorRequest,
                         context: grpc.ServicerContext,
                         ) -> guest_pb2.DescriptorReply:
        self._auth()
        r = self.agent.submit_descriptor(request.logical_device_id, request.wq_id if request.wq_id else None,
                                         bytes(request.descriptor), request.wait, request.timeout_ms,
                                         request.completion_gpa)
        reply = guest_pb2.DescriptorReply(accepted=r.accepted)
        if r.record is not None:
            reply.completion_record = r.record.pack()
            reply.status = r.record.status
            reply.status_name = status_name(r.record.status)
        elif request.wait and r.accepted:
            reply.status_name = "timeout"
        return reply

    @grpc_stream_errors
    async def RunDmatest(self, request: guest_pb2.DmatestParams,
                         context: grpc.aio.ServicerContext[guest_pb2.DmatestParams, guest_pb2.DmatestEvent],
                         ) -> AsyncIterator[guest_pb2.DmatestEvent]:
        """Runs dmatest in a worker thread and streams its run id, lines and
        progress, then the result. StopDmatest ends it as dmatest's run=0 does
        (summaries and result still come); a cancelled call stops it too. The
        stream itself waits on the event loop (no server thread)."""
        self._auth()
        params = dmatest_params(request)
        run_id = next(self._run_ids)
        run = _Run()
        events: AsyncFeed[guest_pb2.DmatestEvent] = AsyncFeed(maxsize=1 << 16)
        outcomes: list[DmatestOutcome] = []
        errors: list[BaseException] = []
        last_progress = [0]

        def progress(done: int) -> None:
            if done - last_progress[0] >= 25:
                last_progress[0] = done
                events.put(guest_pb2.DmatestEvent(progress=done))

        def started(test: Dmatest) -> None:
            with self._runs_lock:
                run.test = test
                stop_now = run.stop_requested
            if stop_now:
                test.stop()

        def work() -> None:
            try:
                outcomes.append(self.agent.run_dmatest(
                    params, emit=lambda line: events.put(guest_pb2.DmatestEvent(line=line)), progress=progress,
                    started=started))
            except BaseException as exc:
                errors.append(exc)
            finally:
                events.close()

        with self._runs_lock:
            self._runs[run_id] = run
        finished = False
        try:
            yield guest_pb2.DmatestEvent(run_id=run_id)
            threading.Thread(target=work, name=f"dmatest-{run_id}", daemon=True).start()
            async for ev in events:
                yield ev
            finished = True
        finally:
            if not finished:  # the call was cancelled (or failed): stop the test threads
                with self._runs_lock:
                    run.stop_requested = True
                    test = run.test
                if test is not None:
                    test.stop()
            with self._runs_lock:
                self._runs.pop(run_id, None)
        if errors:
            raise errors[0]
        outcome = outcomes[0]
        yield guest_pb2.DmatestEvent(progress=outcome.tests)
        yield guest_pb2.DmatestEvent(result=dmatest_result(outcome))

    @grpc_errors
    def StopDmatest(self, request: guest_pb2.DmatestStopRequest,
                    context: grpc.ServicerContext,
                    ) -> guest_pb2.DmatestStopReply:
        """dmatest's ``echo 0 > run``: stop one run (or, with run_id 0, every run of this guest)."""
        self._auth()
        with self._runs_lock:
            runs = [r for i, r in self._runs.items() if request.run_id in (0, i)]
            for r in runs:
                r.stop_requested = True
        for r in runs:
            if r.test is not None:
                r.test.stop()
        return guest_pb2.DmatestStopReply(stopped=len(runs))

    @grpc_stream_errors
    async def StreamFaults(self, request: guest_pb2.FaultsRequest,
                           context: grpc.aio.ServicerContext[guest_pb2.FaultsRequest, guest_pb2.GuestFault],
                           ) -> AsyncIterator[guest_pb2.GuestFault]:
        """Relay the hypervisor's fault stream of this partition (a relay thread
        reads upstream; this stream waits on the event loop)."""
        self._auth()
        upstream = self.agent.hv.stream_faults(follow=request.follow)
        feed: AsyncFeed[hypervisor_pb2.Fault] = AsyncFeed()
        failure: list[grpc.RpcError] = []

        def relay() -> None:
            try:
                for f in upstream:
                    feed.put(f)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    failure.append(exc)
            finally:
                feed.close()

        threading.Thread(target=relay, name="fault-relay", daemon=True).start()
        try:
            async for f in feed:
                yield guest_pb2.GuestFault(sequence=f.sequence, logical_device_id=f.logical_device_id, iova=f.iova,
                                           write=f.write, reason=f.reason, reason_name=f.reason_name,
                                           detail=f.detail)
        finally:
            cancel = getattr(upstream, "cancel", None)
            if cancel is not None:
                cancel()
        if failure:
            raise failure[0]

    @grpc_errors
    def RunSvaTest(self, request: guest_pb2.SvaTestRequest,
                   context: grpc.ServicerContext) -> guest_pb2.SvaTestReply:
        """SVA proposal, not in the series (docs/proposal-sva.md)."""
        self._auth()
        r = self.agent.run_sva_test(request.logical_device_id, request.size, request.iterations,
                                    request.touch_destination, request.unreserved_destination)
        return guest_pb2.SvaTestReply(passed=r.passed, pasid=r.pasid, wq_id=r.wq_id, completed=r.completed,
                                      page_requests=r.page_requests, mismatches=r.mismatches, summary=r.summary(),
                                      errors=r.errors, refused=r.refused)

    @grpc_errors
    def GetStats(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> guest_pb2.AgentStats:
        self._auth()
        return guest_pb2.AgentStats(counters=self.agent.counters())
