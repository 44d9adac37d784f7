"""The hypercall page (docs/transports.md): the raw ABI of ``HvCall`` over
shared memory, opened on the hypervisor's session socket.

Inputs are packed by hand (``test_raw_abi``'s packers, at the reference's
offsets); every case runs once over gRPC ``HvCall`` in one partition and
once over a page in another, set up the same way, and the answers must be
the same bytes."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from pviommu.abi import shm as L
from pviommu.shm.hcpage import HypercallPage, PageAnswer, PageClosed
from pviommu.shm.sessions import SessionError, open_session
from pviommu.v1 import admin_pb2, common_pb2
from tests.kit.hvkit import (
    ADMIN_TOKEN,
    ATTACH,
    CALL_TIMEOUT,
    CONFIGURE,
    CREATE,
    DELETE,
    DETACH,
    FLUSH,
    FLUSH_LIST,
    GET_CAPS,
    GET_PROPERTY,
    MAP,
    SUCCESS,
    UNMAP,
    Guest,
    HvEnv,
    MiB,
)
from tests.kit.rawabi import (
    attach_in,
    caps_in,
    configure_in,
    create_in,
    delete_in,
    detach_in,
    flush_in,
    flush_list_in,
    map_in,
    prop_in,
    unmap_in,
    value,
)

S2 = 0
UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED = "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"


def socket_of(g: Guest) -> str:
    r = g.stub.GetTransports(common_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert r.hypercall_page_version == 1 and r.sessions_per_partition >= 1
    return str(r.session_socket)


def open_page(g: Guest) -> HypercallPage:
    return HypercallPage(socket_of(g), g.token)


def grpc_answer(g: Guest, input_value: int, data: bytes) -> PageAnswer:
    from pviommu.v1 import hypervisor_pb2

    r = g.stub.HvCall(hypervisor_pb2.HvCallRequest(input_value=input_value, input=data), timeout=CALL_TIMEOUT)
    return PageAnswer(r.result_value, bytes(r.output), r.message)


def _steps(dev: int, pid: int) -> list[tuple[int, bytes]]:
    """Every raw call shape, good and bad, in an order that exercises the state."""
    return [
        (value(GET_CAPS), caps_in()),
        (value(GET_CAPS), caps_in(reserved=1)),  # INVALID_PARAMETER
        (value(GET_CAPS), caps_in(pid=pid + 100)),  # another partition: ACCESS_DENIED
        (value(GET_CAPS) | 1 << 16, caps_in()),  # fast bit: INVALID_HYPERCALL_INPUT
        (value(GET_CAPS, 1), caps_in()),  # rep count on a simple call
        (value(GET_CAPS), caps_in()[:-1]),  # truncated
        (value(0x00B5), b""),  # INVALID_HYPERCALL_CODE
        (value(GET_PROPERTY), prop_in(dev)),
        (value(GET_PROPERTY), prop_in(dev, code=11)),  # UNKNOWN_PROPERTY
        (value(GET_PROPERTY), prop_in(0x77)),  # INVALID_DEVICE_ID
        (value(CREATE), create_in(5, flags=1)),
        (value(CREATE), create_in(5)),  # exists: INVALID_PARAMETER
        (value(CREATE), create_in(6, S2)),
        (value(CONFIGURE), configure_in(5, 3 * MiB)),
        (value(CONFIGURE), configure_in(5, 3 * MiB + 1)),  # unaligned root
        (value(ATTACH), attach_in(5, dev)),
        (value(ATTACH), attach_in(5, dev)),  # DEVICE_ALREADY_IN_DOMAIN
        (value(FLUSH), flush_in(5)),
        (value(FLUSH), flush_in(5, flags=1)),
        (value(FLUSH), flush_in(77)),  # no such domain
        (value(FLUSH_LIST, 3), flush_list_in(5, [(0x10, 0), (0x20, 1), (0x40, 2)])),
        (value(FLUSH_LIST, 3, start=1), flush_list_in(5, [(0x10, 0), (0x20, 1), (0x40, 2)])),
        (value(FLUSH_LIST, 2), flush_list_in(5, [(0x10, 0), (0x21, 1)])),  # element 1 unaligned
        (value(FLUSH_LIST, 0), flush_list_in(5, [])),
        (value(MAP, 3), map_in(6, 0x4000_0000, [0x10, 0x11, 0x12])),
        (value(MAP, 2), map_in(6, 0x4000_0000, [0x10, 0xFFFFF])),  # rep 1 outside RAM: reps completed 1
        (value(UNMAP, 2, start=1), unmap_in(6, 0x4000_0000)),
        (value(DETACH), detach_in(dev)),
        (value(DETACH), detach_in(dev)),  # in no domain: INVALID_DEVICE_STATE
        (value(DELETE), delete_in(5)),
        (value(DELETE), delete_in(5)),
        (value(CREATE), create_in(7) + bytes(5)),  # oversized
    ]


def test_page_answers_every_raw_call_shape_exactly_like_hvcall(hv: HvEnv) -> None:
    a, b = hv.partition("a"), hv.partition("b")
    dev_a, _, _ = hv.device("da", a)
    dev_b, _, _ = hv.device("db", b)
    page = open_page(b)
    try:
        steps_a, steps_b = _steps(dev_a, a.pid), _steps(dev_b, b.pid)
        statuses = set()
        for i, ((va, da), (vb, db)) in enumerate(zip(steps_a, steps_b, strict=True)):
            over_grpc, over_page = grpc_answer(a, va, da), page.call(vb, db)
            # device ids and partition ids differ between the two; the rest is the same bytes
            assert (over_page.result_value, over_page.output) == (over_grpc.result_value, over_grpc.output), i
            assert bool(over_page.message) == bool(over_grpc.message), i
            statuses.add(over_page.status)
        assert len(statuses) >= 8  # the cases reach many different statuses
        assert {d.domain_id for d in hv.domains(b.pid).values()} == {d.domain_id for d in hv.domains(a.pid).values()}
    finally:
        page.close()


def test_page_refusal_carries_the_same_message_as_hvcall(hv: HvEnv) -> None:
    g = hv.partition()
    page = open_page(g)
    try:
        for v, data in ((value(0x00B5), b""), (value(FLUSH), flush_in(77)), (value(GET_CAPS), caps_in()[:3])):
            assert page.call(v, data).message == grpc_answer(g, v, data).message != ""
    finally:
        page.close()


def test_token_less_or_foreign_clients_get_no_page(hv: HvEnv) -> None:
    g = hv.partition()
    _, device_token, _ = hv.device("d", g)
    path = socket_of(g)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for request, code in (({"kind": "hypercall_page"}, UNAUTHENTICATED),
                          ({"token": "", "kind": "hypercall_page"}, UNAUTHENTICATED),
                          ({"token": "not-a-token", "kind": "hypercall_page"}, UNAUTHENTICATED),
                          ({"token": ADMIN_TOKEN, "kind": "hypercall_page"}, PERMISSION_DENIED),
                          ({"token": device_token, "kind": "hypercall_page"}, PERMISSION_DENIED),
                          ({"token": g.token, "kind": "nonsense"}, "INVALID_ARGUMENT")):
        with pytest.raises(SessionError) as refused:
            open_session(path, request, timeout=5)
        assert refused.value.code == code, request
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not JSON: refused, and the server goes on
    s.settimeout(5)
    s.connect(path)
    s.sendall(b"{nope\n")
    assert b'"code": "INVALID_ARGUMENT"' in s.recv(4096)
    s.close()
    open_page(g).close()  # the partition's own token does get one


def _wait_for(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_reset_closes_the_partitions_pages_and_the_old_token_opens_none(hv: HvEnv) -> None:
    g = hv.partition()
    path = socket_of(g)
    page = HypercallPage(path, g.token)
    assert page.call(value(CREATE), create_in(5)).status == SUCCESS
    r = hv.admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=g.pid), timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS
    assert _wait_for(lambda: page.closed)
    with pytest.raises(PageClosed) as closed:
        page.call(value(CREATE), create_in(6))
    assert closed.value.reason is L.CloseReason.OWNER_CHANGED
    assert hv.domains(g.pid) == {}  # nothing of the old session ran after the reset
    with pytest.raises(SessionError) as refused:
        HypercallPage(path, g.token)
    assert refused.value.code == UNAUTHENTICATED
    fresh = HypercallPage(path, r.token)
    try:
        assert fresh.call(value(CREATE), create_in(6)).status == SUCCESS
    finally:
        fresh.close()
        page.close()


def test_destroy_closes_the_partitions_pages(hv: HvEnv) -> None:
    g, other = hv.partition(), hv.partition()
    page, kept = open_page(g), open_page(other)
    try:
        r = hv.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=g.pid), timeout=CALL_TIMEOUT)
        assert r.result.status == SUCCESS
        assert _wait_for(lambda: page.closed)
        with pytest.raises(PageClosed):
            page.call(value(GET_CAPS), caps_in())
        assert kept.call(value(GET_CAPS), caps_in()).status == SUCCESS  # another partition's page goes on
    finally:
        page.close()
        kept.close()


def test_pages_per_partition_are_bounded_and_a_closed_one_frees_its_place(make_hv) -> None:
    hv = make_hv("--hypercall-page-sessions", "2")
    g, other = hv.partition(), hv.partition()
    pages = [open_page(g), open_page(g)]
    try:
        with pytest.raises(SessionError) as refused:
            open_page(g)
        assert refused.value.code == RESOURCE_EXHAUSTED and "limit" in str(refused.value)
        pages.append(open_page(other))  # the quota is per partition
        pages.pop(0).close()
        assert _wait_for(lambda: _opens(g))
    finally:
        for p in pages:
            p.close()


def _opens(g: Guest) -> bool:
    try:
        HypercallPage(socket_of(g), g.token).close()
        return True
    except SessionError:
        return False


def test_no_page_is_advertised_when_switched_off(make_hv) -> None:
    hv = make_hv("--no-hypercall-page")
    g = hv.partition()
    r = g.stub.GetTransports(common_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert (r.hypercall_page_version, r.sessions_per_partition) == (0, 0) and r.fault_ring_slots == 256
    with pytest.raises(SessionError) as refused:  # the socket serves fault rings only
        HypercallPage(r.session_socket, g.token)
    assert refused.value.code == "INVALID_ARGUMENT"
    hv = make_hv("--no-hypercall-page", "--no-fault-rings")
    g = hv.partition()
    r = g.stub.GetTransports(common_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert (r.session_socket, r.hypercall_page_version, r.fault_ring_slots) == ("", 0, 0)


def test_session_socket_option_places_the_socket(make_hv, tmp_path: Path) -> None:
    path = tmp_path / "hv-sessions.sock"
    hv = make_hv("--session-socket", str(path))
    g = hv.partition()
    assert socket_of(g) == str(path) and path.exists()
    page = HypercallPage(str(path), g.token)
    page.close()


def test_a_page_with_a_garbage_input_len_gets_invalid_hypercall_input(hv: HvEnv) -> None:
    g = hv.partition()
    page = open_page(g)
    try:
        r = page.region
        seq = r.u64(L.HC_SEQ_REQUEST) + 1
        r.set_u64(L.HC_INPUT_VALUE, value(GET_CAPS))
        r.set_u32(L.HC_INPUT_LEN, 0xFFFF_FFFF)
        r.set_u64(L.HC_SEQ_REQUEST, seq)
        page.request_bell.ring()
        assert _wait_for(lambda: r.u64(L.HC_SEQ_DONE) == seq)
        assert r.u64(L.HC_RESULT_VALUE) & 0xFFFF == 0x3  # HV_STATUS_INVALID_HYPERCALL_INPUT
        assert page.call(value(GET_CAPS), caps_in()).status == SUCCESS  # and the page goes on
    finally:
        page.close()


def test_threads_sharing_a_page_each_get_their_own_answer(hv: HvEnv) -> None:
    import threading

    g = hv.partition()
    page = open_page(g)
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def worker(base: int) -> None:
        for i in range(10):
            status = page.call(value(CREATE), create_in(base + i)).status
            caps = page.call(value(GET_CAPS), caps_in())
            with lock:
                results.append((status, len(caps.output)))

    threads = [threading.Thread(target=worker, args=(100 * (t + 1),)) for t in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        page.close()
    assert results == [(SUCCESS, 24)] * 40
    assert len(hv.domains(g.pid)) == 40


def test_a_call_stalled_on_a_unit_holds_only_its_own_page(make_hv) -> None:
    import threading

    hv = make_hv("--flush-timeout", "2")
    a, b = hv.partition(), hv.partition()
    dev, _, fake = hv.device("d", a, fake=hv.fake_device())
    assert a.create(5) == SUCCESS and a.configure(5, MiB) == SUCCESS and a.attach(5, dev) == SUCCESS
    stalled, quick = open_page(a), open_page(b)
    order: list[str] = []
    fake.servicer.hang.set()

    def flush() -> None:
        order.append(f"a {stalled.call(value(FLUSH), flush_in(5)).status:#x}")

    t = threading.Thread(target=flush)
    try:
        t.start()
        assert _wait_for(lambda: stalled.region.u64(L.HC_SEQ_REQUEST) == 1)
        time.sleep(0.05)  # a's call is in the hypervisor, waiting on the unit
        for _ in range(20):
            assert quick.call(value(GET_CAPS), caps_in()).status == SUCCESS
        order.append("b done")
        t.join(10)
    finally:
        fake.servicer.release.set()
        stalled.close()
        quick.close()
    assert order == ["b done", "a 0x78"]  # b's 20 calls ran while a's flush waited, then a timed out
