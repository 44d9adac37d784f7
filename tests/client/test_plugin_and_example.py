"""The pytest plugin as a user's project meets it: pytest run in a folder
outside the repository with the installed package (the plugin comes from
its ``pytest11`` entry point, no conftest.py), the shipped example project,
scopes, markers, isolation between tests, logs in failing reports, and
attaching to a running system."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pviommu.client import System

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pytest-project"


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PVIOMMU_"))}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *args],
                          cwd=folder, capture_output=True, text=True, timeout=400, env=env)


def _project(tmp_path: Path, ini: str, files: dict[str, str]) -> Path:
    folder = tmp_path / "userproject"
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\n" + textwrap.dedent(ini))
    for name, body in files.items():
        (folder / name).write_text(textwrap.dedent(body))
    assert ROOT not in folder.resolve().parents, "the user project must live outside the repository"
    return folder


def test_the_example_project_passes_outside_the_repository(tmp_path: Path) -> None:
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder)
    out = _pytest(folder)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "4 passed" in out.stdout


def test_the_headline_user_test_stays_under_25_lines() -> None:
    lines = (EXAMPLE / "tests" / "test_isolation.py").read_text().splitlines()
    assert len(lines) < 25, len(lines)


def test_a_failing_test_report_carries_the_service_logs(tmp_path: Path) -> None:
    folder = _project(tmp_path, "", {"test_fails.py": """
        def test_fails_on_purpose(pviommu_device):
            assert pviommu_device.noop().ok
            assert False, "on purpose"
        """})
    out = _pytest(folder)
    assert out.returncode == 1
    section = out.stdout.split("pviommu service logs", 1)
    assert len(section) == 2, out.stdout[-4000:]
    for name in ("--- hypervisor ---", "--- dsa0.0 ---", "--- guest0 ---"):
        assert name in section[1]
    assert '"event": "hypervisor.serving"' in section[1]


SHARING_TESTS = """
    import pytest

    def _note(system, name):
        with open("addresses.txt", "a") as fh:
            fh.write(f"{name} {system.hypervisor_address}\\n")

    def test_one(pviommu_system):
        _note(pviommu_system, "{mod}.one")

    def test_two(pviommu_system):
        _note(pviommu_system, "{mod}.two")

    @pytest.mark.pviommu(fresh=True)
    def test_own(pviommu_system):
        _note(pviommu_system, "{mod}.own")
    """


def _addresses(folder: Path) -> dict[str, str]:
    return dict(line.split() for line in (folder / "addresses.txt").read_text().splitlines())


@pytest.mark.parametrize("scope", ["module", "session"])
def test_systems_are_shared_per_scope_and_fresh_gives_a_test_its_own(tmp_path: Path, scope: str) -> None:
    folder = _project(tmp_path, f"pviommu_scope = {scope}\n", {
        "test_a.py": SHARING_TESTS.replace("{mod}", "a"), "test_b.py": SHARING_TESTS.replace("{mod}", "b")})
    out = _pytest(folder)
    assert out.returncode == 0, out.stdout[-4000:]
    got = _addresses(folder)
    assert got["a.one"] == got["a.two"] and got["b.one"] == got["b.two"]
    assert got["a.own"] not in (got["a.one"], got["b.one"]) and got["b.own"] != got["b.one"]
    assert (got["a.one"] == got["b.one"]) is (scope == "session")


def test_function_scope_starts_a_system_per_test_and_markers_set_the_shape(tmp_path: Path) -> None:
    folder = _project(tmp_path, "pviommu_scope = function\npviommu_memory = 32M\n", {"test_shape.py": """
        import pytest

        def test_default_shape(pviommu_system):
            with open("shape.txt", "a") as fh:
                fh.write(f"{pviommu_system.hypervisor_address} {len(pviommu_system.guests)} "
                         f"{pviommu_system.guests[0].info().ram_bytes}\\n")

        @pytest.mark.pviommu(guests=2, devices=2, lazy=True, design="baseline")
        def test_marked_shape(pviommu_system):
            g = pviommu_system.guests[1]
            assert len(g.devices) == 2 and pviommu_system.lazy and g.design == "baseline"
            with open("shape.txt", "a") as fh:
                fh.write(f"{pviommu_system.hypervisor_address} {len(pviommu_system.guests)} {g.info().ram_bytes}\\n")
        """})
    out = _pytest(folder)
    assert out.returncode == 0, out.stdout[-4000:]
    (a1, n1, ram1), (a2, n2, ram2) = [line.split() for line in (folder / "shape.txt").read_text().splitlines()]
    assert a1 != a2 and (n1, n2) == ("1", "2") and ram1 == ram2 == str(32 << 20)


def test_what_a_test_leaves_behind_is_undone_before_the_next(tmp_path: Path) -> None:
    folder = _project(tmp_path, "pviommu_scope = module\n", {"test_leak.py": """
        def test_leaves_things(pviommu_guest, pviommu_device):
            with open("before.txt", "w") as fh:
                fh.write(str(pviommu_guest.stats()["buffers"]))
            pviommu_device.alloc_map(4096, "to-device")
            dom = pviommu_guest.create_domain("paging")
            pviommu_guest.attach(dom, pviommu_device)
            pviommu_device.alloc_map(8192, "bidirectional")

        def test_sees_a_clean_guest(pviommu_guest, pviommu_device):
            assert str(pviommu_guest.stats()["buffers"]) == open("before.txt").read()
            assert [d.kind for d in pviommu_guest.domains()].count("paging") == 1
            assert pviommu_device.domain.mapped_bytes == 0
        """})
    out = _pytest(folder)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "2 passed" in out.stdout


def test_endpoints_option_attaches_the_tests_to_a_running_system(tmp_path: Path) -> None:
    with System.start_local(guests=1, devices=1) as running:
        ep = running.endpoints().write(tmp_path / "endpoints.json")
        folder = _project(tmp_path, "", {"test_attached.py": f"""
            def test_attached(pviommu_system, pviommu_device):
                assert pviommu_system.hypervisor_address == "{running.hypervisor_address}"
                assert pviommu_device.noop().ok
            """})
        out = _pytest(folder, "--pviommu-endpoints", str(ep))
        assert out.returncode == 0, out.stdout[-4000:]
        assert running.guests[0].info().present  # the attached run did not stop it
