"""The pytest plugin of pviommu (registered as the ``pytest11`` entry point
``pviommu``: installing pviommu is enough, nothing to list in conftest.py).

Fixtures:

* ``pviommu_system`` -- a running ``pviommu.client.System``; its shape comes
  from ``@pytest.mark.pviommu(guests=2, devices=1, memory="64M",
  design="nested", lazy=False, revision=None)`` on the test (or its module or
  class), else from the ini options ``pviommu_guests``, ``pviommu_devices``,
  ``pviommu_memory``, ``pviommu_design``, ``pviommu_lazy``,
  ``pviommu_revision``. Systems are shared per ``pviommu_scope``
  (``function``, ``module`` -- the default -- or ``session``; also
  ``--pviommu-scope`` and the marker's ``scope=``) among the tests asking for
  the same shape; ``fresh=True`` in the marker gives a test its own.
* ``pviommu_guest`` (guest 0), ``pviommu_device`` (its first device),
  ``pviommu_admin``, ``pviommu_hypervisor`` (guest 0's hypercalls).

Isolation: after each test everything the test created through the client
(buffers, mappings, domains) is undone and earlier faults are forgotten
(``System.cleanup``); a system that cannot be cleaned is replaced.

A failing test's report gets a "pviommu service logs" section with the tail
of every service's log. ``--pviommu-endpoints FILE`` (or the ini option
``pviommu_endpoints``) attaches every test to a running system instead --
a ``pviommu run --keep`` or ``pviommu compose endpoints`` file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pviommu.client import Admin, Device, Guest, Hypervisor, System

SCOPES = ("function", "module", "session")
_DEFAULTS: dict[str, str] = {"guests": "1", "devices": "1", "memory": "64M", "design": "nested", "lazy": "false",
                             "revision": "", "scope": "module", "endpoints": ""}
_LOG_SECTION = "pviommu service logs"


@dataclass(frozen=True)
class Shape:
    """What a test asks of its system."""

    guests: int = 1
    devices: int = 1
    memory: str = "64M"
    design: str = "nested"
    lazy: bool = False
    revision: str | None = None


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pviommu", "pviommu virtual systems")
    group.addoption("--pviommu-scope", choices=SCOPES, default=None,
                    help="how long a pviommu_system lives (default: ini pviommu_scope, else module)")
    group.addoption("--pviommu-endpoints", metavar="FILE", default=None,
                    help="attach to the running system in this endpoints file instead of starting one")
    for key, default in _DEFAULTS.items():
        parser.addini(f"pviommu_{key}", f"pviommu_system default {key} (default: {default or 'none'})",
                      default=default)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pviommu(guests=1, devices=1, memory='64M', design='nested', lazy=False, revision=None, "
                   "scope=None, fresh=False): the virtual system pviommu_system gives this test")
    config.stash[_POOL] = _Pool(config)


def _setting(config: pytest.Config, key: str) -> str:
    value = config.getini(f"pviommu_{key}")
    return str(value) if value not in (None, "") else _DEFAULTS[key]


class _Pool:
    """The running systems, by shape, and when each must go."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.systems: dict[tuple[Shape, str, str], System] = {}  # (shape, scope, module) -> system
        self.attached: System | None = None

    def endpoints(self) -> str:
        return str(self.config.getoption("--pviommu-endpoints") or _setting(self.config, "endpoints") or
                   os.environ.get("PVIOMMU_ENDPOINTS", ""))

    def get(self, shape: Shape, scope: str, module: str, fresh: bool) -> System:
        from pviommu.client import System

        path = self.endpoints()
        if path:
            if self.attached is None:
                self.attached = System.from_endpoints(path)
            if len(self.attached.guests) < shape.guests:
                pytest.skip(f"the attached system has {len(self.attached.guests)} guests, the test needs "
                            f"{shape.guests}")
            return self.attached
        key = (shape, scope, module if scope == "module" else "")
        if not fresh and scope != "function" and key in self.systems:
            return self.systems[key]
        system = System.start_local(shape.guests, shape.devices, shape.memory, design=shape.design, lazy=shape.lazy,
                                    revision=shape.revision)
        if not fresh and scope != "function":
            self.systems[key] = system
        return system

    def release(self, system: System, dirty: bool) -> None:
        """After a test: close a private or dirty system, keep a shared clean one."""
        shared = [k for k, s in self.systems.items() if s is system]
        if system is self.attached:
            return
        if not shared or dirty:
            for k in shared:
                del self.systems[k]
            system.close()

    def end_module(self, module: str) -> None:
        for key in [k for k in self.systems if k[1] == "module" and k[2] == module]:
            self.systems.pop(key).close()

    def close(self) -> None:
        for system in self.systems.values():
            system.close()
        self.systems.clear()
        if self.attached is not None:
            self.attached.close()
            self.attached = None


_POOL = pytest.StashKey[_Pool]()


def _shape(request: pytest.FixtureRequest) -> tuple[Shape, str, bool]:
    config = request.config
    kw: dict[str, Any] = {}
    marker = request.node.get_closest_marker("pviommu")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("@pytest.mark.pviommu takes keyword arguments only (guests=2, ...)")
        kw = dict(marker.kwargs)
    unknown = set(kw) - {"guests", "devices", "memory", "design", "lazy", "revision", "scope", "fresh"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.pviommu: unknown argument(s) {', '.join(sorted(unknown))}")
    revision = kw.get("revision", _setting(config, "revision") or None)
    def get(key: str) -> Any:
        return kw.get(key, _setting(config, key))

    shape = Shape(int(get("guests")), int(get("devices")), str(get("memory")), str(get("design")),
                  _bool(get("lazy")), str(revision) if revision else None)
    scope = str(kw.get("scope") or config.getoption("--pviommu-scope") or _setting(config, "scope"))
    if scope not in SCOPES:
        raise pytest.UsageError(f"pviommu scope {scope!r} is not one of {', '.join(SCOPES)}")
    return shape, scope, _bool(kw.get("fresh", False))


@pytest.fixture
def pviommu_system(request: pytest.FixtureRequest) -> Iterator[System]:
    """A running virtual host (see the plugin's docstring for its shape and lifetime)."""
    pool = request.config.stash[_POOL]
    shape, scope, fresh = _shape(request)
    module = request.node.module.__name__ if getattr(request.node, "module", None) else ""
    system = pool.get(shape, scope, module, fresh)
    request.node.stash[_SYSTEM] = system
    dirty = False
    try:
        yield system
    finally:
        try:
            dirty = bool(system.cleanup())
        except Exception:  # the services are gone or hung: replace the system
            dirty = True
        pool.release(system, dirty)


_SYSTEM = pytest.StashKey["System"]()


@pytest.fixture
def pviommu_guest(pviommu_system: System) -> Guest:
    """Guest 0 of ``pviommu_system``."""
    return pviommu_system.guests[0]


@pytest.fixture
def pviommu_device(pviommu_guest: Guest) -> Device:
    """Guest 0's first device."""
    return pviommu_guest.devices[0]


@pytest.fixture
def pviommu_admin(pviommu_system: System) -> Admin:
    return pviommu_system.admin


@pytest.fixture
def pviommu_hypervisor(pviommu_guest: Guest) -> Hypervisor:
    """Guest 0's hypercall interface."""
    return pviommu_guest.hypervisor


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.failed:
        from pviommu.client.errors import StartError

        system = item.stash.get(_SYSTEM, None)
        err = call.excinfo.value if call.excinfo is not None else None
        logs = err.logs if isinstance(err, StartError) else system.logs() if system is not None else ""
        if logs:
            rep.sections.append((_LOG_SECTION, logs))
    return rep


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    pool = item.config.stash.get(_POOL, None)
    module = getattr(getattr(item, "module", None), "__name__", "")
    if pool is not None and (nextitem is None or getattr(getattr(nextitem, "module", None), "__name__", "") != module):
        pool.end_module(module)


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(_POOL, None)
    if pool is not None:
        pool.close()
