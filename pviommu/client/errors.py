"""The client's one exception family.

Every failure a script can meet through ``pviommu.client`` is a
``ClientError``: it carries the gRPC code (``code``, None when the call never
reached a server or was answered in band), the Hyper-V status by name
(``hv_status_name``, e.g. ``HV_STATUS_ACCESS_DENIED``) and, for device work,
the DSA completion status by name (``dsa_status_name``). ``except
ClientError`` catches them all; the subclasses say where it came from.
"""

from __future__ import annotations

from typing import Any

import grpc

from pviommu.abi.dsa import STATUS_MASK, DsaStatus
from pviommu.abi.hv_status import HvStatus


def dsa_status_name(code: int) -> str:
    """``DSA_COMP_<NAME>`` for the code bits of a completion status byte (hex when unknown)."""
    try:
        return "DSA_COMP_" + DsaStatus(code & STATUS_MASK).name
    except ValueError:
        return f"DSA_COMP_{code & STATUS_MASK:#04x}"


class ClientError(Exception):
    """Base of every error of ``pviommu.client``."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, hv_status: int | None = None,
                 dsa_status: int | None = None, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The gRPC status code of the failed call (None: in band, or never sent).
        self.code = code
        #: The Hyper-V status the hypervisor answered (None: not a hypercall).
        self.hv_status = hv_status
        #: The DSA completion status code (None: not device work).
        self.dsa_status = dsa_status
        #: The rich error details the server sent (google.rpc.ErrorInfo metadata).
        self.details = dict(details or {})

    @property
    def code_name(self) -> str | None:
        return self.code.name if self.code is not None else None

    @property
    def hv_status_name(self) -> str | None:
        return HvStatus.name_of(self.hv_status) if self.hv_status is not None else None

    @property
    def dsa_status_name(self) -> str | None:
        return dsa_status_name(self.dsa_status) if self.dsa_status is not None else None

    def as_dict(self) -> dict[str, Any]:
        """For JSON output: the message and every status by name."""
        out: dict[str, Any] = {"error": type(self).__name__, "message": self.message}
        for key in ("code_name", "hv_status_name", "dsa_status_name"):
            value = getattr(self, key)
            if value is not None:
                out[key.removesuffix("_name")] = value
        return out

    def __str__(self) -> str:
        names = [n for n in (self.code_name, self.hv_status_name, self.dsa_status_name) if n]
        return f"{self.message} [{', '.join(names)}]" if names else self.message


class RpcError(ClientError):
    """A call a server refused or could not serve (a gRPC error status)."""


class Unreachable(RpcError):
    """No server answered at the address (nothing listening, or it did not
    come up within the wait), or it answered UNAVAILABLE (a service it
    depends on is down)."""


class HvCallError(ClientError):
    """A hypercall the hypervisor answered with a status other than SUCCESS
    (gRPC OK: the refusal is the answer). ``reps_completed`` for rep calls."""

    def __init__(self, message: str, *, hv_status: int, reps_completed: int = 0, call: str = "") -> None:
        super().__init__(message, hv_status=hv_status)
        self.reps_completed = reps_completed
        self.call = call


class DsaError(ClientError):
    """A descriptor that completed with a status other than SUCCESS, raised by
    ``Completion.check()`` (named operations return the record; they raise
    only when asked with ``check=True``)."""

    def __init__(self, message: str, *, dsa_status: int, record: Any = None) -> None:
        super().__init__(message, dsa_status=dsa_status)
        #: The decoded completion record (``pviommu.client.Completion``).
        self.record = record


class StartError(ClientError):
    """A local system could not be started; ``logs`` holds the services' log tails."""

    def __init__(self, message: str, *, logs: str = "") -> None:
        super().__init__(message)
        self.logs = logs


def from_rpc_error(exc: grpc.RpcError, what: str = "") -> ClientError:
    """A ``ClientError`` for a failed gRPC call, with the HV or DSA status the
    server put in its rich details (pviommu.rpc.status)."""
    from pviommu.rpc.status import error_info

    code = exc.code() if hasattr(exc, "code") else None
    text = exc.details() if hasattr(exc, "details") else str(exc)
    try:
        info = error_info(exc)
    except Exception:  # not a call object, or no rich status
        info = {}
    hv = int(info["hv_status"], 0) if "hv_status" in info else None
    dsa = int(info["dsa_status"], 0) if "dsa_status" in info else None
    if dsa is not None and hv == HvStatus.OPERATION_FAILED:
        hv = None  # a device error carries the generic HV status: the DSA one is the real one
    message = f"{what}: {text}" if what else str(text)
    cls: type[ClientError] = Unreachable if code == grpc.StatusCode.UNAVAILABLE else RpcError
    return cls(message, code=code, hv_status=hv, dsa_status=dsa, details=info)
