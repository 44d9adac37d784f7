"""The hypercall and fault trace: one JSON object per line, appended as it happens.

``pviommu serve hypervisor --trace FILE`` opens a ``TraceWriter``; it is fed
from two places only: ``Hypercalls.dispatch`` (every judged hypercall, typed
or raw, under the host lock, so lines are in execution order) and the admin
servicer (partition and device changes, fault reports). ``pviommu replay``
reads it back (pvctl/replay.py).

Lines (``kind`` first; every line has ``seq`` and ``t``, seconds since the epoch):

* ``trace_start``: ``version``, ``config`` (the hypervisor's options);
* ``hypercall``: ``partition`` {``id``, ``name``}, ``code``, ``call``,
  ``input_value`` (the TLFS u64: code, rep count, rep start) and ``input`` (hex
  of the packed input block, from ``pviommu.abi.hv.encode_request``), then the
  answer: ``status``, ``status_name``, ``reps``;
* ``admin``: ``op`` (create_partition, reset_partition, destroy_partition,
  register_device, unregister_device, assign_device, unassign_device),
  ``status``, ``status_name`` and the op's arguments and results (partition
  {id, name}, device {id, name}, ...);
* ``fault``: ``partition``, ``device``, ``iova``, ``write``, ``reason``,
  ``reason_name``, ``page_request``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.model import Partition
from pviommu.abi import hv
from pviommu.abi.hv.sva import SvaInput, encode_sva_request
from pviommu.abi.hv_status import HvStatus
from pviommu.log import get_logger

log = get_logger("trace")

TRACE_VERSION = 1


def who(part: Partition | None, partition_id: int = 0) -> dict[str, Any]:
    if part is None:
        return {"id": partition_id, "name": ""}
    return {"id": part.partition_id, "name": part.name}


class TraceWriter:
    """Appends trace lines to ``path`` (flushed per line: a killed hypervisor
    leaves a trace that replays up to its last line)."""

    def __init__(self, path: Path | str, config: HypervisorConfig | None = None) -> None:
        self.path = Path(path)
        self._fh: TextIO | None = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._seq = 0
        self._write({"kind": "trace_start", "version": TRACE_VERSION,
                     "config": asdict(config) if config is not None else {}})

    def _write(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._fh is None:
                return
            self._seq += 1
            line = json.dumps({"kind": record.pop("kind"), "seq": self._seq, "t": round(time.time(), 6), **record},
                              separators=(",", ":"), default=str)
            self._fh.write(line + "\n")
            self._fh.flush()

    def hypercall(self, caller: Partition, request: hv.HvRequest | SvaInput, status: int, reps: int) -> None:
        try:
            value, data = encode_sva_request(request) if isinstance(request, SvaInput) else hv.encode_request(request)
        except Exception as exc:  # a trace must never change a hypercall's answer
            log.warning("trace.encode_failed", call=request.CODE.name, error=str(exc))
            return
        self._write({"kind": "hypercall", "partition": who(caller), "code": int(request.CODE),
                     "call": request.CODE.name, "input_value": value.encode(), "input": data.hex(),
                     "status": int(status), "status_name": HvStatus.name_of(status), "reps": reps})

    def admin(self, op: str, status: int, **fields: Any) -> None:
        self._write({"kind": "admin", "op": op, "status": int(status), "status_name": HvStatus.name_of(status),
                     **fields})

    def fault(self, **fields: Any) -> None:
        self._write({"kind": "fault", **fields})

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
