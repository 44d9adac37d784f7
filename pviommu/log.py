"""structlog set-up shared by every service and the command line.

JSON lines when stderr is not a terminal (containers, CI, log collectors),
readable colour output on a terminal. Each service binds who it is
(service, partition, domain, device) once with ``bind_identity``; per-call
values go through ``structlog.contextvars`` so they appear on every line the
call logs (the gRPC sync server gives interceptor and handler one context).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False
#: Process identity (service, partition, device, ...), added to every line of
#: every thread -- gRPC handler threads do not inherit the main thread's
#: contextvars, so this cannot live there.
_identity: dict[str, Any] = {}


def _add_identity(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in _identity.items():
        event.setdefault(key, value)
    return event


#: Keys whose integer values are ids, addresses or bitmaps: logged as hex
#: strings, so a device id reads the same in every service's log (and in
#: the CLI and the client's reprs).
HEX_KEYS = frozenset({"device", "logical_device_id", "device_id", "iova", "gpa", "hpa", "addr", "fault_addr", "root",
                      "root_gpa", "page_table_root", "iommu_cap", "pgsize_bitmap", "slot_hpa", "context_hpa"})


def _hex_ids(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in HEX_KEYS.intersection(event):
        value = event[key]
        if isinstance(value, int) and not isinstance(value, bool):
            event[key] = f"{value:#x}"
    return event


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    global _configured
    level_name = (level or os.environ.get("PVIOMMU_LOG_LEVEL", "info")).upper()
    if json is None:
        forced = os.environ.get("PVIOMMU_LOG_FORMAT")
        json = forced == "json" if forced else not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_identity,
        _hex_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level_name]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _configured = True


def bind_identity(**identity: Any) -> None:
    """Bind the process identity (service, partition, device, ...) to every line."""
    _identity.update({k: v for k, v in identity.items() if v is not None})


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A bound structlog logger; configures defaults on first use."""
    if not _configured:
        configure()
    logger = structlog.get_logger(name) if name else structlog.get_logger()
    return logger.bind(**initial) if initial else logger
