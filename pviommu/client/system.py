"""A whole virtual host: the hypervisor (``admin``), its guests, their devices.

Three ways to get one:

* ``System.start_local(guests=2, devices=1)`` starts every service as a
  process on loopback (``pviommu.client.local``) and stops them on ``close``;
* ``System.attach(hypervisor=..., admin_token=..., guests=[(addr, token), ...])``
  for services already running anywhere;
* ``System.from_endpoints(path)`` / ``System.from_compose(project)`` for a
  ``pviommu run --keep`` endpoints file or a docker-compose stack.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pviommu.client.admin import Admin
from pviommu.client.endpoints import Endpoints, ServiceEndpoint
from pviommu.client.endpoints import from_compose as _from_compose
from pviommu.client.errors import ClientError, StartError
from pviommu.client.guest import Guest
from pviommu.client.hypervisor import Hypervisor
from pviommu.client.local import LocalHost
from pviommu.mem.placement import FsInfo
from pviommu.units import parse_size


class System:
    """The services of one virtual host, as client objects."""

    def __init__(self, hypervisor_address: str, admin_token: str, guests: Sequence[Guest], *,
                 local: LocalHost | None = None, design: str = "nested", lazy: bool = False,
                 revision: str | None = None, kind: str = "attached", extra: dict[str, Any] | None = None) -> None:
        self.hypervisor_address = hypervisor_address
        self.admin_token = admin_token
        self.admin = Admin(hypervisor_address, admin_token)
        self.guests = list(guests)
        #: The processes, when this System started them (None when attached).
        self.local = local
        self.design = design
        self.lazy = lazy
        self.revision = revision
        self.kind = kind
        self.extra = dict(extra or {})
        self._closed = False

    def __repr__(self) -> str:
        return (f"System(kind={self.kind!r}, hypervisor={self.hypervisor_address!r}, "
                f"guests={[g.name for g in self.guests]!r})")

    # -- ways to get one ----------------------------------------------------------------
    @classmethod
    def start_local(cls, guests: int = 1, devices: int = 1, memory: int | str = "64M", *, lazy: bool = False,
                    design: str = "nested", revision: str | None = None, memory_dir: str | Path | None = None,
                    hypervisor_args: Sequence[str] = (), guest_args: Sequence[str] = (),
                    device_args: Sequence[str] = (), timeout: float = 60.0,
                    s2_baseline: bool | None = None) -> System:
        """Start a hypervisor, ``guests`` guest agents with ``devices`` DSA
        devices each (``memory`` of RAM per guest) as local processes.
        ``lazy``: guests batch IOTLB flushes; ``design`` is what ``dmatest``
        uses by default; ``revision`` is passed to the services as
        ``--revision``; ``s2_baseline`` offers the map-by-hypercall (S2)
        domains, which the baseline design needs (default: on exactly for
        ``design="baseline"``; off, the twin is the series' interface).
        Raises StartError with the services' logs."""
        if design not in ("nested", "baseline"):
            raise ValueError(f"design {design!r} is not 'nested' or 'baseline'")
        size = parse_size(memory) if isinstance(memory, str) else memory
        extra = [*guest_args, *(["--lazy"] if lazy else [])]
        if design == "baseline" if s2_baseline is None else s2_baseline:
            hypervisor_args = [*hypervisor_args, "--s2-baseline"]
        host = LocalHost(guests, devices, size, memory_dir, extra, hypervisor_args=hypervisor_args,
                         device_args=device_args, revision=revision, start_timeout=timeout)
        try:
            host.start()
        except BaseException as exc:
            logs = host.logs()
            host.stop()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise StartError(f"the local system did not start: {exc}", logs=logs) from None
        assert host.hypervisor is not None
        hv = host.hypervisor.address
        clients = [Guest(g.address, g.token, name=g.name, hypervisor_address=hv, design=design) for g in host.guests]
        return cls(hv, host.admin_token, clients, local=host, design=design, lazy=lazy, revision=revision,
                   kind="local")

    @classmethod
    def attach(cls, hypervisor: str, admin_token: str, guests: Iterable[tuple[str, str]] = (), *,
               names: Sequence[str] = (), design: str = "nested") -> System:
        """Services already running: the hypervisor's address and admin
        token, and each guest agent's (address, partition token)."""
        clients = [Guest(addr, token, name=names[i] if i < len(names) else f"guest{i}", hypervisor_address=hypervisor,
                         design=design) for i, (addr, token) in enumerate(guests)]
        return cls(hypervisor, admin_token, clients, design=design)

    @classmethod
    def from_endpoints(cls, source: str | Path | Endpoints | dict[str, Any]) -> System:
        """Attach to what an endpoints file (``pviommu run --keep``,
        ``pviommu compose endpoints``) describes."""
        if isinstance(source, Endpoints):
            ep = source
        elif isinstance(source, dict):
            ep = Endpoints.from_json(source)
        else:
            ep = Endpoints.load(source)
        design = str(ep.extra.get("design") or "nested")
        clients = [Guest(g.address, g.token, name=g.name, hypervisor_address=ep.hypervisor.address, design=design)
                   for g in ep.guests]
        return cls(ep.hypervisor.address, ep.admin_token, clients, design=design, lazy=bool(ep.extra.get("lazy")),
                   revision=ep.extra.get("revision"), kind=ep.kind, extra=ep.extra)

    @classmethod
    def from_compose(cls, project: str, *, prefer_published: bool = True) -> System:
        """Attach to a running docker-compose stack (``docker-compose -p PROJECT up``)."""
        return cls.from_endpoints(_from_compose(project, prefer_published=prefer_published))

    # -- parts ----------------------------------------------------------------------------
    def guest(self, which: int | str = 0) -> Guest:
        """A guest by position or name."""
        for g in self.guests:
            if g.name == which:
                return g
        if isinstance(which, int) and 0 <= which < len(self.guests):
            return self.guests[which]
        raise ClientError(f"no guest {which!r} (guests: {', '.join(g.name for g in self.guests) or 'none'})")

    def hypervisor(self, guest: int | str | Guest = 0) -> Hypervisor:
        """The hypercall interface with a guest's credential."""
        return (guest if isinstance(guest, Guest) else self.guest(guest)).hypervisor

    @property
    def bank_fs(self) -> FsInfo | None:
        """The file system of the memory banks (local systems)."""
        return self.local.bank_fs if self.local is not None else None

    def wait_ready(self, devices_per_guest: int = 1, timeout: float = 60.0) -> System:
        """Wait until every guest answers and sees its devices (compose stacks boot asynchronously)."""
        deadline = time.monotonic() + timeout
        for g in self.guests:
            g.wait_devices(devices_per_guest, timeout=max(1.0, deadline - time.monotonic()))
        return self

    def endpoints(self) -> Endpoints:
        local = self.local
        guests = []
        for i, g in enumerate(self.guests):
            devs = local.guests[i].devices if local is not None and i < len(local.guests) else []
            pid = local.guests[i].partition_id if local is not None and i < len(local.guests) else 0
            guests.append(ServiceEndpoint(g.name, g.address, g.token, partition_id=pid, devices=list(devs)))
        devices = []
        if local is not None:
            ids = {n: d for lg in local.guests for n, d in zip((f"dsa{lg.index}.{k}" for k in range(len(lg.devices))),
                                                                lg.devices, strict=False)}
            devices = [ServiceEndpoint(p.name, p.address, logical_device_id=ids.get(p.name, 0)) for p in local.devices]
        extra = {**self.extra, "design": self.design, "lazy": self.lazy, "revision": self.revision}
        if local is not None:
            extra["filesystem"] = local.bank_fs.as_dict()
        memory_dir = str(local.memory_dir) if local is not None else str(self.extra.get("memory_dir", ""))
        return Endpoints(self.kind, ServiceEndpoint("hypervisor", self.hypervisor_address), self.admin_token, guests,
                         devices, memory_dir, extra)

    def logs(self, lines: int = 60) -> str:
        """The services' log tails (local systems; "" when attached)."""
        return self.local.logs(lines) if self.local is not None else ""

    def cleanup(self) -> list[str]:
        """Every guest's ``cleanup()``: what this client created is undone."""
        return [f"{g.name}: {p}" for g in self.guests for p in g.cleanup()]

    # -- life cycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close every channel; stop the services when this System started them."""
        if self._closed:
            return
        self._closed = True
        for g in self.guests:
            g.close()
        self.admin.close()
        if self.local is not None:
            self.local.stop()

    stop = close

    def __enter__(self) -> System:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
