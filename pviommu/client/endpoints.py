"""Where a running system's services are, and their credentials.

One JSON format for every way a system runs: ``pviommu run --keep`` writes
it, ``pviommu compose endpoints`` writes it for a docker-compose stack, and
``System.from_endpoints(path)`` (or the pytest plugin's
``--pviommu-endpoints``) attaches to it::

    {"version": 1, "kind": "local" | "compose",
     "hypervisor": {"address": "127.0.0.1:40123", "admin_token": "...", "metrics_port": null},
     "guests": [{"name": "guest0", "address": "...", "token": "...", "partition_id": "0x1",
                 "devices": ["0x2a43c750"], "metrics_port": null}],
     "devices": [{"name": "dsa0.0", "address": "...", "logical_device_id": "0x2a43c750"}],
     "memory_dir": "/dev/shm/pviommu-banks-x1y2", "filesystem": {...}, "design": "nested", ...}

The file holds credentials: it is written with mode 0600.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pviommu.client.errors import ClientError

VERSION = 1
#: The keys of the format itself (anything else is carried along as ``extra``).
_KNOWN = frozenset({"version", "kind", "hypervisor", "guests", "devices", "memory_dir"})


@dataclass
class ServiceEndpoint:
    name: str
    address: str
    token: str = ""
    metrics_port: int | None = None
    partition_id: int = 0
    devices: list[int] = field(default_factory=list)
    logical_device_id: int = 0


@dataclass
class Endpoints:
    kind: str
    hypervisor: ServiceEndpoint
    admin_token: str
    guests: list[ServiceEndpoint] = field(default_factory=list)
    devices: list[ServiceEndpoint] = field(default_factory=list)
    memory_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        hv = {"address": self.hypervisor.address, "admin_token": self.admin_token,
              "metrics_port": self.hypervisor.metrics_port}
        guests = [{"name": g.name, "address": g.address, "token": g.token, "partition_id": f"{g.partition_id:#x}",
                   "devices": [f"{d:#x}" for d in g.devices], "metrics_port": g.metrics_port} for g in self.guests]
        devices = [{"name": d.name, "address": d.address, "logical_device_id": f"{d.logical_device_id:#x}",
                    "metrics_port": d.metrics_port} for d in self.devices]
        extra = {k: v for k, v in self.extra.items() if k not in _KNOWN}
        return {"version": VERSION, "kind": self.kind, "hypervisor": hv, "guests": guests, "devices": devices,
                "memory_dir": self.memory_dir, **extra}

    def write(self, path: str | Path) -> Path:
        """Write atomically with mode 0600 (it holds tokens)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_json(), fh, indent=2)
            fh.write("\n")
        tmp.rename(out)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Endpoints:
        try:
            hv = data["hypervisor"]
            guests = [ServiceEndpoint(g.get("name", f"guest{i}"), g["address"], g.get("token", ""),
                                      g.get("metrics_port"), _int(g.get("partition_id", 0)),
                                      [_int(d) for d in g.get("devices", [])])
                      for i, g in enumerate(data.get("guests", []))]
            devices = [ServiceEndpoint(d.get("name", ""), d.get("address", ""), metrics_port=d.get("metrics_port"),
                                       logical_device_id=_int(d.get("logical_device_id", 0)))
                       for d in data.get("devices", [])]
            return cls(data.get("kind", "attached"), ServiceEndpoint("hypervisor", hv["address"],
                                                                     metrics_port=hv.get("metrics_port")),
                       hv.get("admin_token", ""), guests, devices, data.get("memory_dir", ""),
                       {k: v for k, v in data.items() if k not in _KNOWN})
        except (KeyError, TypeError, ValueError) as exc:
            raise ClientError(f"not a pviommu endpoints document: missing or bad {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Endpoints:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ClientError(f"cannot read the endpoints file {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ClientError(f"the endpoints file {path} is not JSON: {exc}") from None
        return cls.from_json(data)


def _int(value: Any) -> int:
    return int(value, 0) if isinstance(value, str) else int(value)


# -- docker-compose ------------------------------------------------------------------------------
_LISTEN = re.compile(r":(\d+)$")


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def _address(container: Any, port: int, prefer_published: bool) -> str:
    """A host-reachable address of ``port`` in ``container``: the published
    host port when there is one, else the container's IP on its network."""
    ports = container.attrs.get("NetworkSettings", {}).get("Ports") or {}
    bound = ports.get(f"{port}/tcp") or []
    if prefer_published and bound:
        host_ip = bound[0].get("HostIp") or "127.0.0.1"
        host_ip = "127.0.0.1" if host_ip in ("0.0.0.0", "::", "") else host_ip
        return f"{host_ip}:{bound[0]['HostPort']}"
    networks = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
    for net in networks.values():
        if net.get("IPAddress"):
            return f"{net['IPAddress']}:{port}"
    raise ClientError(f"container {container.name} has neither a published port {port} nor a network address")


def _read(container: Any, path: str) -> str:
    out = container.exec_run(["cat", path])
    if out.exit_code != 0:
        raise _Booting(f"cannot read {path} in {container.name}: {out.output.decode(errors='replace').strip()}")
    return str(out.output.decode().strip())


def from_compose(project: str, *, prefer_published: bool = True, client: Any = None, wait: float = 0.0,
                 on_wait: Callable[[str], None] | None = None) -> Endpoints:
    """``_from_compose``, retried for up to ``wait`` seconds while the stack
    is still booting (a guest has not written its token yet); a project
    with no hypervisor at all is refused at once."""
    deadline = time.monotonic() + wait
    next_notice = time.monotonic() + 1.0
    while True:
        try:
            return _from_compose(project, prefer_published=prefer_published, client=client)
        except _Booting as exc:
            if time.monotonic() >= deadline:
                raise ClientError(str(exc)) from None
            if on_wait is not None and time.monotonic() >= next_notice:
                on_wait(f"waiting for compose project {project!r}: {exc}")
                next_notice = time.monotonic() + 5.0
            time.sleep(0.5)


class _Booting(ClientError):
    """The stack is there but not ready yet (a token file is missing)."""


def _from_compose(project: str, *, prefer_published: bool = True, client: Any = None) -> Endpoints:
    """The endpoints of a running ``docker-compose -p PROJECT`` stack, found
    through the Docker Engine: every container of the project labelled as a
    pviommu service (its command says ``serve hypervisor|guest|dsa``), its
    published port (or container IP), and the tokens the guests wrote with
    ``--token-out`` (read inside the container)."""
    try:
        import docker
    except ImportError:
        raise ClientError("attaching to a compose stack needs the Docker SDK: pip install 'pviommu[docker]'") from None
    try:
        dc = client or docker.from_env(timeout=30)
        containers = dc.containers.list(filters={"label": f"com.docker.compose.project={project}"})
    except Exception as exc:
        raise ClientError(f"no Docker Engine answers ({type(exc).__name__}: {exc})") from None
    hv: ServiceEndpoint | None = None
    admin_token = ""
    guests, devices = [], []
    for c in sorted(containers, key=lambda c: c.name):
        args = list(c.attrs.get("Args") or [])
        if len(args) < 2 or args[0] != "serve":
            continue
        listen = _arg(args, "--listen") or ""
        m = _LISTEN.search(listen)
        port = int(m.group(1)) if m else {"hypervisor": 50051, "guest": 50061, "dsa": 50071}.get(args[1], 0)
        service = c.labels.get("com.docker.compose.service", c.name)
        address = _address(c, port, prefer_published)
        metrics = _arg(args, "--metrics-port")
        metrics_port = int(metrics) if metrics and metrics.isdigit() else None
        if args[1] == "hypervisor":
            hv = ServiceEndpoint(service, address, metrics_port=metrics_port)
            env = dict(e.split("=", 1) for e in c.attrs.get("Config", {}).get("Env", []) if "=" in e)
            admin_token = env.get("PVIOMMU_ADMIN_TOKEN", "")
            token_file = _arg(args, "--admin-token-file")
            if token_file:
                admin_token = _read(c, token_file)
        elif args[1] == "guest":
            token_out = _arg(args, "--token-out")
            token = _read(c, token_out) if token_out else ""
            guests.append(ServiceEndpoint(service, address, token, metrics_port))
        elif args[1] == "dsa":
            devices.append(ServiceEndpoint(_arg(args, "--name") or service, address, metrics_port=metrics_port))
    if hv is None:
        raise ClientError(f"compose project {project!r} has no running pviommu hypervisor "
                          f"(containers: {', '.join(c.name for c in containers) or 'none'})")
    return Endpoints("compose", hv, admin_token, guests, devices, "/banks", {"project": project})


__all__ = ["Endpoints", "ServiceEndpoint", "from_compose"]
