"""The registry of calls and the strict decoder of raw hypercalls (statuses: docs/hypercall-statuses.md)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pviommu.abi.hv._checks import _padding
from pviommu.abi.hv.codes import HV_HYP_PAGE_SIZE, REP_CALLS, HvCallCode
from pviommu.abi.hv.inputs import (
    AttachDeviceDomainInput,
    ConfigureDeviceDomainInput,
    CreateDeviceDomainInput,
    DeleteDeviceDomainInput,
    DetachDeviceDomainInput,
    FlushDeviceDomainInput,
    GetIommuCapabilitiesInput,
    GetLogicalDevicePropertyInput,
)
from pviommu.abi.hv.outputs import GetIommuCapabilitiesOutput, GetLogicalDevicePropertyOutput
from pviommu.abi.hv.reps import (
    FlushDeviceDomainListHeader,
    FlushDeviceDomainListRequest,
    FlushVa,
    MapDeviceGpaPagesHeader,
    MapDeviceGpaPagesRequest,
    UnmapDeviceGpaPagesInput,
    UnmapDeviceGpaPagesRequest,
)
from pviommu.abi.hv.values import HypercallInput, check_reps
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError

# --------------------------------------------------------------------------------------------
# Registry and the strict decoder
# --------------------------------------------------------------------------------------------

HvSimpleInput = (
    CreateDeviceDomainInput
    | DeleteDeviceDomainInput
    | AttachDeviceDomainInput
    | DetachDeviceDomainInput
    | ConfigureDeviceDomainInput
    | FlushDeviceDomainInput
    | GetIommuCapabilitiesInput
    | GetLogicalDevicePropertyInput
)
HvRepRequest = FlushDeviceDomainListRequest | MapDeviceGpaPagesRequest | UnmapDeviceGpaPagesRequest
#: What :func:`decode_input` returns: the input struct of a simple call, a ``*Request`` of a rep call.
HvRequest = HvSimpleInput | HvRepRequest
HvOutput = GetIommuCapabilitiesOutput | GetLogicalDevicePropertyOutput
RepHeader = FlushDeviceDomainListHeader | MapDeviceGpaPagesHeader | UnmapDeviceGpaPagesInput
#: one element of MAP_DEVICE_GPA_PAGES's ``gpa_page_list``: a u64 GPA page number
GPA_PAGE_SIZE = 8

#: ``(fixed part, rep_count, rep_start, elements, strict_padding) -> request``
_Decoder = Callable[[bytes, int, int, bytes, bool], HvRequest]


@dataclass(frozen=True)
class CallSpec:
    """One row of the registry: what a generic raw-ABI dispatcher needs to know about a call.

    ``header_size`` is the fixed part's C size; ``rep_element_size`` is 0 for simple calls and
    for UNMAP (a rep call with no input elements)."""

    code: HvCallCode
    request_type: type[HvRequest]
    output_type: type[HvOutput] | None
    is_rep: bool
    header_size: int
    rep_element_size: int
    _decode: _Decoder = field(repr=False, compare=False)

    @property
    def padded_header_size(self) -> int:
        return (self.header_size + 7) & ~7


def _simple(cls: type[HvSimpleInput]) -> _Decoder:
    def decode(fixed: bytes, _count: int, _start: int, _elems: bytes, strict: bool) -> HvRequest:
        return cls.unpack(fixed, strict_padding=strict)

    return decode


def _decode_flush_list(fixed: bytes, count: int, start: int, elems: bytes, strict: bool) -> HvRequest:
    header = FlushDeviceDomainListHeader.unpack(fixed, strict_padding=strict)
    vas = tuple(FlushVa.from_u64(raw) for raw in struct.unpack(f"<{count}Q", elems))
    return FlushDeviceDomainListRequest(header, vas, start)


def _decode_map(fixed: bytes, count: int, start: int, elems: bytes, strict: bool) -> HvRequest:
    header = MapDeviceGpaPagesHeader.unpack(fixed, strict_padding=strict)
    return MapDeviceGpaPagesRequest(header, struct.unpack(f"<{count}Q", elems), start)


def _decode_unmap(fixed: bytes, count: int, start: int, _elems: bytes, strict: bool) -> HvRequest:
    return UnmapDeviceGpaPagesRequest(UnmapDeviceGpaPagesInput.unpack(fixed, strict_padding=strict), count, start)


def _simple_spec(cls: type[HvSimpleInput], output: type[HvOutput] | None = None) -> CallSpec:
    return CallSpec(cls.CODE, cls, output, False, cls.SIZE, 0, _simple(cls))


def _rep_spec(cls: type[HvRepRequest], header: type[RepHeader], element_size: int, decode: _Decoder) -> CallSpec:
    return CallSpec(cls.CODE, cls, None, True, header.SIZE, element_size, decode)


#: code -> :class:`CallSpec`, for every :class:`HvCallCode`; sizes come from the layouts.
CALLS: Mapping[HvCallCode, CallSpec] = MappingProxyType(
    {
        spec.code: spec
        for spec in (
            _simple_spec(CreateDeviceDomainInput),
            _simple_spec(DeleteDeviceDomainInput),
            _simple_spec(AttachDeviceDomainInput),
            _simple_spec(DetachDeviceDomainInput),
            _simple_spec(ConfigureDeviceDomainInput),
            _simple_spec(FlushDeviceDomainInput),
            _simple_spec(GetIommuCapabilitiesInput, GetIommuCapabilitiesOutput),
            _simple_spec(GetLogicalDevicePropertyInput, GetLogicalDevicePropertyOutput),
            _rep_spec(FlushDeviceDomainListRequest, FlushDeviceDomainListHeader, FlushVa.SIZE, _decode_flush_list),
            _rep_spec(MapDeviceGpaPagesRequest, MapDeviceGpaPagesHeader, GPA_PAGE_SIZE, _decode_map),
            _rep_spec(UnmapDeviceGpaPagesRequest, UnmapDeviceGpaPagesInput, 0, _decode_unmap),
        )
    }
)
if any(spec.is_rep != (spec.code in REP_CALLS) for spec in CALLS.values()):
    raise AssertionError("REP_CALLS and the registry disagree")


def call_spec(code: int) -> CallSpec:
    """The registry row for ``code``; HvError(INVALID_HYPERCALL_CODE) for an unknown code."""
    try:
        return CALLS[HvCallCode(code)]
    except ValueError:
        raise HvError(HvStatus.INVALID_HYPERCALL_CODE, f"hypercall code 0x{code:x} is not recognized") from None


def _bad_input(message: str) -> HvError:
    return HvError(HvStatus.INVALID_HYPERCALL_INPUT, message)


def decode_input(code: int, rep_count: int, rep_start: int, data: bytes, *, strict_padding: bool = False) -> HvRequest:
    """Decode the input block of call ``code`` into its typed request, or raise HvError.

    Checks, in order (why each status: docs/hypercall-statuses.md):

    1. ``code`` known, else INVALID_HYPERCALL_CODE;
    2. simple call: ``rep_count == rep_start == 0``; rep call: ``1 <= rep_count <= 4095`` and
       ``rep_start < rep_count``; else INVALID_HYPERCALL_INPUT;
    3. header + ``rep_count`` elements fit in one 4 KiB input page, else INVALID_ALIGNMENT;
    4. length: at least the structure (else INVALID_HYPERCALL_INPUT, truncated); at most the
       structure rounded up to 8 bytes for a simple call, exactly header + ``rep_count``
       elements for a rep call (else INVALID_HYPERCALL_INPUT, oversized);
    5. fields: non-zero reserved fields/bits -> INVALID_PARAMETER; non-zero padding is ignored
       (TLFS), or INVALID_PARAMETER when ``strict_padding``.
    """
    spec = call_spec(code)
    name = spec.code.name
    if not spec.is_rep:
        if rep_count != 0 or rep_start != 0:
            raise _bad_input(f"{name} is a simple call: rep count {rep_count}, rep start {rep_start}")
    else:
        check_reps(name, rep_count, rep_start)
    elements_size = rep_count * spec.rep_element_size
    needed = spec.header_size + elements_size if spec.is_rep else spec.header_size
    allowed = spec.padded_header_size + elements_size
    if allowed > HV_HYP_PAGE_SIZE:
        raise HvError(
            HvStatus.INVALID_ALIGNMENT,
            f"{name}: {allowed} bytes of input for {rep_count} reps span more than one page",
        )
    if len(data) < needed:
        raise _bad_input(f"{name}: input truncated, {len(data)} bytes of {needed}")
    if len(data) > allowed:
        raise _bad_input(f"{name}: input has {len(data)} bytes, at most {allowed} allowed")
    fixed = data[: spec.header_size]
    tail_pad = data[spec.header_size : spec.padded_header_size] if not spec.is_rep else b""
    _padding(f"{name} trailing padding", tail_pad, strict_padding)
    elements = data[spec.header_size : spec.header_size + elements_size]
    return spec._decode(fixed, rep_count, rep_start, elements, strict_padding)


def decode_call(input_value: int, data: bytes, *, strict_padding: bool = False) -> HvRequest:
    """Decode a whole raw hypercall (the ``HvCall`` method's ``input_value`` and ``input``).

    Unknown code -> INVALID_HYPERCALL_CODE (checked first); reserved bits of the input value,
    the fast bit, a non-zero variable header size or the nested bit -> INVALID_HYPERCALL_INPUT;
    then :func:`decode_input`.
    """
    value = HypercallInput.decode(input_value)
    call_spec(value.call_code)
    if value.reserved:
        raise _bad_input(f"reserved bits 0x{value.reserved:x} of the hypercall input value are set")
    if value.fast:
        raise _bad_input("the fast (register) calling convention is not offered for this call")
    if value.variable_header_size:
        raise _bad_input(f"variable header size {value.variable_header_size}: this call has none")
    if value.nested:
        raise _bad_input("nested bit set: there is no L0 hypervisor behind this one")
    return decode_input(value.call_code, value.rep_count, value.rep_start, data, strict_padding=strict_padding)


def encode_request(request: HvRequest) -> tuple[HypercallInput, bytes]:
    """The guest side of :func:`decode_call`: the input value and the packed input block."""
    if isinstance(request, HvRepRequest):
        value = HypercallInput(request.CODE, rep_count=request.rep_count, rep_start=request.rep_start)
    else:
        value = HypercallInput(request.CODE)
    return value, request.pack()


def encode_output(code: int, output: HvOutput | None) -> bytes:
    """The packed output block of call ``code`` (empty for calls without output).

    ValueError if ``output`` is not the call's output type: a handler bug, not a guest error.
    """
    spec = call_spec(code)
    if spec.output_type is None:
        if output is not None:
            raise ValueError(f"{spec.code.name} has no output, got {type(output).__name__}")
        return b""
    if not isinstance(output, spec.output_type):
        raise ValueError(f"{spec.code.name} outputs {spec.output_type.__name__}, got {type(output).__name__}")
    return output.pack()


def decode_output(code: int, data: bytes) -> HvOutput | None:
    """The guest side of :func:`encode_output`; ValueError if ``data`` does not fit the layout."""
    spec = call_spec(code)
    if spec.output_type is None:
        if data:
            raise ValueError(f"{spec.code.name} has no output, got {len(data)} bytes")
        return None
    return spec.output_type.unpack(data)
