"""The typed gRPC messages and ``pviommu.abi.hv`` convert both ways without loss
(``pviommu.rpc.hvproto``): a request survives hv -> message -> wire bytes -> message -> hv for
every typed call and every field value, and so does an answer through its reply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Iova
from pviommu.errors import HvError
from pviommu.rpc import hvproto
from pviommu.v1 import hypervisor_pb2 as pb
from tests.kit.hvstrategies import device_domains, hv_requests, u64

DD = hv.DeviceDomain(hv.HV_PARTITION_ID_SELF, hv.DeviceDomainId(1, 7))


@given(hv_requests(typed=True))
def test_every_typed_request_round_trips_through_its_message(request: hv.HvRequest) -> None:
    message = hvproto.request_to_proto(request)
    wire = type(message).FromString(message.SerializeToString())
    assert hvproto.code_of(wire) == request.CODE
    assert hvproto.request_from_proto(wire) == request


def test_every_typed_call_has_a_method_and_a_message() -> None:
    assert set(hvproto.METHOD) == set(hv.HvCallCode)
    assert all(hasattr(pb, f"{name}Request") for name in hvproto.METHOD.values())


outputs = st.one_of(
    st.builds(hv.GetIommuCapabilitiesOutput, st.integers(0, 255), st.integers(0, 255), u64, u64,
              st.integers(0, 0xFFFF_FFFF)),
    st.builds(hv.GetLogicalDevicePropertyOutput, u64),
)


@given(outputs)
def test_a_successful_answer_with_output_round_trips_through_its_reply(output: hv.HvOutput) -> None:
    code = (hv.HvCallCode.GET_IOMMU_CAPABILITIES if isinstance(output, hv.GetIommuCapabilitiesOutput)
            else hv.HvCallCode.GET_LOGICAL_DEVICE_PROPERTY)
    answer = hvproto.Answer(HvStatus.SUCCESS, output=output)
    reply = hvproto.reply_to_proto(code, answer)
    assert hvproto.answer_from_proto(type(reply).FromString(reply.SerializeToString())) == answer


@given(st.sampled_from(list(hv.HvCallCode)), st.sampled_from([int(s) for s in HvStatus if s]),
       st.text(max_size=20), st.integers(0, 4095))
def test_a_refusal_round_trips_through_its_reply_without_output(code: hv.HvCallCode, status: int, message: str,
                                                                 reps: int) -> None:
    carries_reps = code in hv.REP_CALLS
    answer = hvproto.Answer(status, message, reps if carries_reps else 0)
    reply = hvproto.reply_to_proto(code, answer)
    assert reply.result.status_name == HvStatus.name_of(status)
    assert hvproto.answer_from_proto(reply) == answer


@given(device_domains)
def test_device_domain_round_trips_through_its_message(dd: hv.DeviceDomain) -> None:
    assert hvproto.device_domain_from_proto(hvproto.device_domain_to_proto(dd)) == dd


def test_what_no_typed_message_carries_is_not_converted_silently() -> None:
    with pytest.raises(ValueError, match="rep start"):
        hvproto.request_to_proto(hv.UnmapDeviceGpaPagesRequest(hv.UnmapDeviceGpaPagesInput(DD, Iova(0)), 2, 1))
    header = hv.MapDeviceGpaPagesHeader(DD, 3, Iova(0), hv.HvInputVtl(1))
    with pytest.raises(ValueError, match="target_vtl"):
        hvproto.request_to_proto(hv.MapDeviceGpaPagesRequest(header, (1,)))


@pytest.mark.parametrize("message", [
    pb.FlushDeviceDomainListRequest(list=[pb.FlushVa(page_mask_shift=0x1000)]),  # 12-bit field
    pb.FlushDeviceDomainListRequest(list=[pb.FlushVa(page_number=1 << 52)]),  # 52-bit field
    pb.DeleteDeviceDomainRequest(device_domain=pb.DeviceDomain(domain_type=16)),  # 4-bit field
])
def test_a_message_field_wider_than_its_c_field_is_invalid_parameter(message: hvproto.TypedRequest) -> None:
    with pytest.raises(HvError) as refused:
        hvproto.request_from_proto(message)
    assert refused.value.hv_status is HvStatus.INVALID_PARAMETER
