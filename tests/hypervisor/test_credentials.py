"""Who may call what: the bearer token decides, for every method of every
service (walked from the proto descriptors, so a new method is covered)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hypervisor_pb2
from tests.kit.hvkit import ADMIN_TOKEN, CALL_TIMEOUT, SELF, SUCCESS, HvEnv

HYPERVISOR = hypervisor_pb2.DESCRIPTOR.services_by_name["Hypervisor"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
DEVICE_HOST = admin_pb2.DESCRIPTOR.services_by_name["DeviceHost"]
#: Hypervisor methods that do not name the caller's partition (an empty round trip).
UNATTRIBUTED = {"Ping"}


def invoke(channel: grpc.Channel, service: Any, method_name: str) -> grpc.StatusCode:
    """Call ``service/method`` with an empty request; the gRPC status code it ends with."""
    m = service.methods_by_name[method_name]
    req_cls = message_factory.GetMessageClass(m.input_type)
    resp_cls = message_factory.GetMessageClass(m.output_type)
    path = f"/{service.full_name}/{m.name}"
    try:
        if m.server_streaming:
            stub = channel.unary_stream(path, request_serializer=req_cls.SerializeToString,
                                        response_deserializer=resp_cls.FromString)
            for _ in stub(req_cls(), timeout=CALL_TIMEOUT):
                pass
        else:
            stub = channel.unary_unary(path, request_serializer=req_cls.SerializeToString,
                                       response_deserializer=resp_cls.FromString)
            stub(req_cls(), timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


def all_methods() -> list[tuple[Any, str]]:
    return [(svc, name) for svc in (HYPERVISOR, ADMIN, DEVICE_HOST) for name in svc.methods_by_name]


def method_id(case: tuple[Any, str]) -> str:
    return f"{case[0].name}.{case[1]}"


@pytest.mark.parametrize("case", all_methods(), ids=method_id)
def test_no_token_is_unauthenticated_and_changes_nothing(hv: HvEnv, case: tuple[Any, str]) -> None:
    hv.partition()
    ch = hv.channel(None)
    assert hv.unchanged(invoke, ch, *case) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token", ["not-a-token", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], " "])
def test_unknown_token_is_unauthenticated(hv: HvEnv, token: str) -> None:
    g = hv.partition()
    hv.device("d", g)
    ch = hv.channel(token)
    for case in all_methods():
        assert hv.unchanged(invoke, ch, *case) == grpc.StatusCode.UNAUTHENTICATED, method_id(case)


def test_token_in_another_scheme_is_unauthenticated(hv: HvEnv) -> None:
    g = hv.partition()
    ch = grpc.insecure_channel(hv.address)
    hv.channels.append(ch)
    call = ch.unary_unary("/pviommu.v1.Hypervisor/GetIommuCapabilities",
                          request_serializer=hypervisor_pb2.GetIommuCapabilitiesRequest.SerializeToString,
                          response_deserializer=hypervisor_pb2.GetIommuCapabilitiesReply.FromString)
    for md in ([("authorization", f"Basic {g.token}")], [("authorization", g.token)], [("x-token", g.token)]):
        with pytest.raises(grpc.RpcError) as err:
            call(hypervisor_pb2.GetIommuCapabilitiesRequest(), metadata=md, timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = call(hypervisor_pb2.GetIommuCapabilitiesRequest(partition_id=SELF),
                 metadata=[("authorization", f"Bearer {g.token}")], timeout=CALL_TIMEOUT)
    assert reply.result.status == SUCCESS


@pytest.mark.parametrize("name", sorted(set(HYPERVISOR.methods_by_name) - UNATTRIBUTED))
def test_admin_and_device_tokens_on_guest_methods_are_permission_denied(hv: HvEnv, name: str) -> None:
    g = hv.partition()
    _, device_token, _ = hv.device("d", g)
    for token in (ADMIN_TOKEN, device_token):
        assert hv.unchanged(invoke, hv.channel(token), HYPERVISOR, name) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("name", sorted(ADMIN.methods_by_name))
def test_partition_and_device_tokens_on_admin_methods_are_permission_denied(hv: HvEnv, name: str) -> None:
    g = hv.partition()
    _, device_token, _ = hv.device("d", g)
    for token in (g.token, device_token):
        assert hv.unchanged(invoke, hv.channel(token), ADMIN, name) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("name", sorted(DEVICE_HOST.methods_by_name))
def test_device_host_takes_only_the_device_token(hv: HvEnv, name: str) -> None:
    g = hv.partition()
    _, device_token, _ = hv.device("d", g)
    for token in (g.token, ADMIN_TOKEN):
        assert hv.unchanged(invoke, hv.channel(token), DEVICE_HOST, name) == grpc.StatusCode.PERMISSION_DENIED
    assert invoke(hv.channel(device_token), DEVICE_HOST, name) == grpc.StatusCode.OK


def test_each_token_reaches_its_own_service(hv: HvEnv) -> None:
    g = hv.partition()
    _, device_token, _ = hv.device("d", g)
    assert invoke(hv.channel(g.token), HYPERVISOR, "GetIommuCapabilities") == grpc.StatusCode.OK
    assert invoke(hv.channel(ADMIN_TOKEN), ADMIN, "ListPartitions") == grpc.StatusCode.OK
    assert invoke(hv.channel(device_token), DEVICE_HOST, "Heartbeat") == grpc.StatusCode.OK


def test_destroyed_partitions_token_is_unauthenticated(hv: HvEnv) -> None:
    g = hv.partition()
    r = hv.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=g.pid), timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS
    assert invoke(hv.channel(g.token), HYPERVISOR, "GetIommuCapabilities") == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(hv: HvEnv) -> None:
    ch = hv.channel(None)
    health = health_pb2_grpc.HealthStub(ch)
    for name in ("", "pviommu.v1.Hypervisor", "pviommu.v1.Admin", "pviommu.v1.DeviceHost"):
        r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_token_comes_from_a_file_too(make_hv, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PVIOMMU_ADMIN_TOKEN")
    token_file = tmp_path / "admin.token"
    token_file.write_text("file-token-123\n")
    env = make_hv("--admin-token-file", str(token_file))
    ch = connect(env.address, "file-token-123")
    env.channels.append(ch)
    assert admin_pb2_grpc.AdminStub(ch).ListPartitions(common_pb2.Empty(), timeout=CALL_TIMEOUT).partitions == []
    assert invoke(env.channel(ADMIN_TOKEN), ADMIN, "ListPartitions") == grpc.StatusCode.UNAUTHENTICATED


def test_no_admin_token_configured_refuses_to_start(tmp_path, monkeypatch) -> None:
    from hypervisor_svc.main import build
    from tests.kit.hvkit import hv_args

    monkeypatch.delenv("PVIOMMU_ADMIN_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        build(hv_args("--memory-dir", str(tmp_path / "banks")), "127.0.0.1:0")
