"""What scripts and CI rely on from the ``pviommu`` command: signals stop
``pviommu run`` with full cleanup, documented exit codes, one-line errors
without tracebacks, machine output (--json, --junit-xml, endpoints files),
no wrapping and periodic progress off a terminal, and the guest operations'
help, named descriptors and memory dumps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pviommu.client import System
from pviommu.client.local import LocalHost
from pviommu.mem.placement import SHM_ROOT, filesystem_of

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

CLI = [sys.executable, "-m", "pvctl.cli"]
TMPFS = SHM_ROOT.is_dir() and filesystem_of(SHM_ROOT).memory_backed


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _human_lines(stderr: str) -> list[str]:
    """stderr without the services' JSON log lines and the waiting lines."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("{") and "waiting for" not in ln]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(path: Path, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared in {path}:\n{path.read_text()[-3000:]}")


# -- pviommu run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_ends_run_with_every_service_and_folder_removed(tmp_path: Path, sig: signal.Signals) -> None:
    err = tmp_path / "stderr"
    with open(err, "w") as fh:
        proc = subprocess.Popen([*CLI, "run", "--iterations", "1000000", "--progress-interval", "0.3"],
                                stdout=subprocess.DEVNULL, stderr=fh)
    try:
        text = _wait_for(err, "progress: guest0")
        banks = Path(text.split("memory banks in ", 1)[1].split(":", 1)[0])
        children = _children(proc.pid)
        assert len(children) == 3, children  # hypervisor, device, guest
        cmdline = Path(f"/proc/{children[0]}/cmdline").read_bytes().split(b"\0")
        workdir = Path(cmdline[cmdline.index(b"--port-file") + 1].decode()).parent
        assert banks.is_dir() and workdir.is_dir()
        proc.send_signal(sig)
        assert proc.wait(60) == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [c for c in children if _alive(c)], "services survived the signal"
    assert not banks.exists() and not workdir.exists()
    assert f"interrupted by {sig.name}: stopping the services" in err.read_text()


def test_run_keep_prints_the_result_then_writes_endpoints_that_a_client_attaches_to(tmp_path: Path) -> None:
    out, ep = tmp_path / "stdout", tmp_path / "endpoints.json"
    with open(out, "w") as fh:
        proc = subprocess.Popen([*CLI, "run", "--iterations", "20", "--keep", "--endpoints", str(ep)], stdout=fh,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ep.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "total: 20 tests, 0 failures" in out.read_text(), "--keep must still print the result"
        data = json.loads(ep.read_text())
        assert oct(ep.stat().st_mode & 0o777) == "0o600"  # it holds tokens
        assert data["kind"] == "local" and data["memory_dir"] and data["hypervisor"]["admin_token"]
        system = System.from_endpoints(ep)
        try:
            assert system.guests[0].info().present and system.admin.devices()
        finally:
            system.close()
        for port in (data["hypervisor"]["metrics_port"], data["guests"][0]["metrics_port"],
                     data["devices"][0]["metrics_port"]):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert "pviommu_" in body
        guest_metrics = urllib.request.urlopen(f"http://127.0.0.1:{data['guests'][0]['metrics_port']}/metrics",
                                               timeout=10).read().decode()
        assert "pviommu_guest_" in guest_metrics and 'service="guest"' in guest_metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not ep.exists() and not Path(data["memory_dir"]).exists()


def test_run_json_records_the_configuration_and_the_banks_file_system(tmp_path: Path) -> None:
    out = _run("run", "--iterations", "20", "--json", "--seed", "7", "--lazy", "--design", "baseline")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    cfg = result["config"]
    assert (cfg["design"], cfg["lazy"], cfg["seed"]) == ("baseline", True, 7)
    assert cfg["revision"] == {"hypervisor": "v2", "guests": "v2"}  # the defaults, recorded
    assert result["total"]["tests"] == 20 and result["total"]["failures"] == 0
    if TMPFS:
        assert result["banks"]["fs_type"] == "tmpfs" and result["banks"]["memory_backed"] is True
        assert result["banks"]["path"].startswith(str(SHM_ROOT))


def test_run_off_a_terminal_prints_progress_lines_unwrapped_and_a_junit_report(tmp_path: Path) -> None:
    report = tmp_path / "run.xml"
    out = _run("run", "--iterations", "1500", "--progress-interval", "0.2", "--junit-xml", str(report))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert any(ln.startswith("progress: guest0 ") and "/1500 tests" in ln for ln in lines), out.stderr[-2000:]
    banks = [ln for ln in lines if ln.startswith("memory banks in ")]
    assert len(banks) == 1 and len(banks[0]) > 80 and banks[0].rstrip().endswith(("GiB", "MiB", "KiB", "B"))
    assert "\x1b[" not in out.stderr, "no colour codes off a terminal"
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "0", "0")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["design"] == "nested" and props["iterations"] == "1500"
    assert [c.get("name") for c in suite.iter("testcase")] == ["guest0 dmatest (nested)"]


def test_banks_in_a_disk_folder_are_warned_about_and_removed(tmp_path: Path) -> None:
    if filesystem_of(tmp_path).memory_backed:
        pytest.skip("the test folder is on a tmpfs here")
    out = _run("run", "--iterations", "10", "--memory-dir", str(tmp_path / "mine"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "disk-backed" in out.stderr and str(tmp_path / "mine") in out.stderr
    assert not (tmp_path / "mine" / "banks").exists()


# -- one line, documented exit codes -------------------------------------------------------------
def _one_clear_line(out: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    human = _human_lines(out.stderr)
    assert len(human) == 1 and needle in human[0], human


def test_a_size_beyond_a_bank_window_is_refused_in_one_line() -> None:
    _one_clear_line(_run("run", "--memory", "2T"), 2, "below 1 TiB")
    _one_clear_line(_run("run", "--memory", "lots"), 2, "is not a size")


def test_a_port_in_use_is_one_line_exit_5_and_leaves_no_bank_or_socket(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        banks = tmp_path / "banks"
        banks.mkdir()
        env = {"PVIOMMU_ADMIN_TOKEN": "t", "PVIOMMU_TOKEN": "t"}
        out = _run("serve", "hypervisor", "--listen", f"127.0.0.1:{port}", "--memory-dir", str(banks), env=env)
        _one_clear_line(out, 5, "already in use")
        assert list(banks.iterdir()) == []
        out = _run("serve", "dsa", "--listen", f"127.0.0.1:{port}", "--hypervisor", "127.0.0.1:1", env=env)
        _one_clear_line(out, 5, "already in use")


@pytest.mark.parametrize("service", ["dsa", "guest"])
def test_an_unreachable_hypervisor_says_waiting_then_one_line_exit_2(service: str) -> None:
    args = ["--provision", "g"] if service == "guest" else []
    started = time.monotonic()
    out = _run("serve", service, "--listen", "127.0.0.1:0", "--hypervisor", "127.0.0.1:1", "--connect-timeout", "2.5",
               *args, env={"PVIOMMU_ADMIN_TOKEN": "t"})
    assert time.monotonic() - started < 30
    assert "waiting for the hypervisor at 127.0.0.1:1" in out.stderr
    _one_clear_line(out, 2, "no gRPC server answered at 127.0.0.1:1")


@pytest.mark.pviommu(guests=2, devices=1, scope="module")
def test_grpc_call_refuses_bad_json_and_unknown_fields_and_fails_on_status_when_asked(pviommu_system: System) -> None:
    addr, tok = pviommu_system.hypervisor_address, pviommu_system.admin_token
    method = "pviommu.v1.Admin/CreatePartition"
    _one_clear_line(_run("grpc", "call", addr, method, f"--token={tok}", "-d", '{"name": '), 2, "not valid")
    _one_clear_line(_run("grpc", "call", addr, method, f"--token={tok}", "-d", '{"nmae": "x"}'), 2, "no field")
    g0, g1 = pviommu_system.guests
    attach = json.dumps({"deviceDomain": {"partitionId": str(0xFFFF_FFFF_FFFF_FFFF), "domainType": 1,
                                          "domainId": g0.devices[0].domain.domain_id},
                         "deviceId": str(g1.devices[0].id)})
    hv_method = "pviommu.v1.Hypervisor/AttachDeviceDomain"
    plain = _run("grpc", "call", addr, hv_method, f"--token={g0.token}", "-d", attach, "--compact")
    assert plain.returncode == 0 and json.loads(plain.stdout)["result"]["statusName"] == "HV_STATUS_ACCESS_DENIED"
    strict = _run("grpc", "call", addr, hv_method, f"--token={g0.token}", "-d", attach, "--fail-on-status")
    _one_clear_line(strict, 1, "HV_STATUS_ACCESS_DENIED")


@pytest.mark.pviommu(guests=2, devices=1, scope="module")
def test_health_exit_codes_follow_grpc_health_probe(pviommu_system: System) -> None:
    addr = pviommu_system.hypervisor_address
    assert _run("grpc", "health", addr).returncode == 0
    assert _run("grpc", "health", addr, "no.such.Service").returncode == 3
    assert _run("grpc", "health", "127.0.0.1:1", "--connect-timeout", "1").returncode == 2


@pytest.mark.pviommu(guests=2, devices=1, scope="module")
def test_replay_refuses_a_hypervisor_that_is_not_fresh_unless_forced(pviommu_system: System, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"kind": "trace_start", "seq": 1}) + "\n")
    args = ["replay", str(trace), "--hypervisor", pviommu_system.hypervisor_address,
            f"--token={pviommu_system.admin_token}"]  # a token may start with "-"
    _one_clear_line(_run(*args), 2, "is not fresh (2 partitions, 2 devices)")
    forced = _run(*args, "--force")
    assert forced.returncode == 0 and "warning: the hypervisor is not fresh" in forced.stderr


@pytest.mark.pviommu(guests=2, devices=1, scope="module")
def test_inspect_tables_off_a_terminal_are_neither_wrapped_nor_truncated(pviommu_system: System) -> None:
    out = _run("inspect", pviommu_system.hypervisor_address, "devices", f"--token={pviommu_system.admin_token}")
    assert out.returncode == 0
    for dev in pviommu_system.admin.devices():
        row = next(ln for ln in out.stdout.splitlines() if dev.name in ln)
        assert dev.control_address in row and f"{dev.logical_device_id:#x}" in row
    assert "…" not in out.stdout


def test_compose_endpoints_without_the_stack_is_one_line_exit_2() -> None:
    out = _run("compose", "endpoints", "-p", "pviommu-no-such-project-x9")
    _one_clear_line(out, 2, "pviommu compose endpoints:")


# -- pviommu guest ---------------------------------------------------------------------------------
def _guest(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    g = system.guests[0]
    return _run("guest", g.address, *args, env={"PVIOMMU_TOKEN": g.token})


def test_each_guest_operation_lists_its_fields_in_help_even_without_an_address() -> None:
    out = _run("guest", "map", "--help")
    assert out.returncode == 0
    for field in ("logical_device_id", "domain_id", "gpa", "size", "direction", "iova", "on_demand"):
        assert f"\n  {field} " in out.stdout
    assert "BIDIRECTIONAL, TO_DEVICE, FROM_DEVICE" in out.stdout
    sub = _run("guest", "ADDR", "submit", "--help").stdout
    assert "op=memmove" in sub and "op=crc" in sub and "dst= src= size= flags=" in sub


@pytest.mark.pviommu(guests=2, devices=1, scope="module")
def test_named_submit_alloc_map_and_read_hex_out_from_the_shell(pviommu_system: System, tmp_path: Path) -> None:
    dev = f"{pviommu_system.guests[0].devices[0].id:#x}"
    src = json.loads(_guest(pviommu_system, "alloc-map", f"device={dev}", "size=4K", "direction=to-device",
                            "fill=0x5a").stdout)
    dst = json.loads(_guest(pviommu_system, "alloc-map", f"device={dev}", "size=4K", "direction=FROM_DEVICE").stdout)
    assert src["iova"].startswith("0x") and src["gpa"].startswith("0x") and src["size"] == 4096
    out = _guest(pviommu_system, "submit", "op=memmove", f"device={dev}", f"src={src['iova']}", f"dst={dst['iova']}",
                 "size=4K")
    rec = json.loads(out.stdout)
    assert out.returncode == 0 and rec["status_name"] == "DSA_COMP_SUCCESS" and rec["ok"] is True
    hexed = _guest(pviommu_system, "read", f"gpa={dst['gpa']}", "size=32", "--hex")
    assert hexed.stdout.splitlines()[0].startswith(f"{int(dst['gpa'], 16):#014x}: 5a 5a 5a")
    raw = tmp_path / "dst.bin"
    assert _guest(pviommu_system, "read", f"gpa={dst['gpa']}", "size=4096", "--out", str(raw)).returncode == 0
    assert raw.read_bytes() == b"\x5a" * 4096
    wrong = _guest(pviommu_system, "submit", "op=memmove", f"device={dev}", f"src={dst['iova']}",
                   f"dst={src['iova']}", "size=4K")  # src is TO_DEVICE: the device may not write it
    assert wrong.returncode == 0 and json.loads(wrong.stdout)["status_name"] == "DSA_COMP_PAGE_FAULT_NOBOF"
    strict = _guest(pviommu_system, "submit", "op=memmove", f"device={dev}", f"src={dst['iova']}",
                    f"dst={src['iova']}", "size=4K", "--fail-on-status")
    _one_clear_line(strict, 1, "DSA_COMP_PAGE_FAULT_NOBOF")


@pytest.mark.pviommu(guests=2, devices=1, scope="module")
def test_bad_enum_values_and_fields_are_named_clearly(pviommu_system: System) -> None:
    _one_clear_line(_guest(pviommu_system, "map", "gpa=0x200000", "size=4096", "direction=SIDEWAYS"), 2,
                    "direction: 'SIDEWAYS' is not one of BIDIRECTIONAL, TO_DEVICE, FROM_DEVICE")
    _one_clear_line(_guest(pviommu_system, "unmap", "skip_flush=maybe"), 2, "not a boolean")
    _one_clear_line(_guest(pviommu_system, "submit", "op=memmove", "sauce=1"), 2, "op=memmove has no field 'sauce'")
    _one_clear_line(_guest(pviommu_system, "submit", "op=teleport"), 2, "unknown DSA operation 'teleport'")


@pytest.mark.skipif(not TMPFS, reason="no tmpfs /dev/shm here")
def test_a_hypervisors_own_bank_folder_goes_on_sigterm_and_after_sigkill_with_the_next_start(tmp_path: Path) -> None:
    def start(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([*CLI, "serve", "hypervisor", "--listen", "127.0.0.1:0"], stdout=fh, stderr=fh,
                                    env={**os.environ, "PVIOMMU_ADMIN_TOKEN": "t", "PVIOMMU_LOG_FORMAT": "json"})
        rec = json.loads(next(ln for ln in _wait_for(log, '"hypervisor.serving"').splitlines()
                              if '"hypervisor.serving"' in ln))
        assert rec["banks_fs"] == "tmpfs" and rec["banks_in_memory"] is True
        return proc, Path(rec["memory_dir"])

    proc, folder = start("first")
    assert folder.parent == SHM_ROOT and (folder / "bank-00000.mem").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0 and not folder.exists()
    proc, folder = start("second")
    proc.kill()  # SIGKILL: nothing can clean up ...
    proc.wait(30)
    assert folder.exists()
    proc, third = start("third")  # ... until the next bank folder is made
    try:
        assert not folder.exists() and third.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.pviommu(guests=2, devices=1, scope="module")
@pytest.mark.pviommu(guests=2, design="baseline")  # both designs (S2 offered), isolation across 2 guests
def test_scenario_writes_a_junit_report_with_one_case_per_step(pviommu_system: System, tmp_path: Path) -> None:
    args = ["scenario", "--hypervisor", pviommu_system.hypervisor_address, "--iterations", "10",
            "--junit-xml", str(tmp_path / "scenario.xml")]
    for g in pviommu_system.guests:
        (tmp_path / f"{g.name}.token").write_text(g.token)
        args += ["--guest", f"{g.address}={tmp_path / f'{g.name}.token'}"]
    out = _run(*args, env={"PVIOMMU_ADMIN_TOKEN": pviommu_system.admin_token}, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    suite = ET.parse(tmp_path / "scenario.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names == ["iommu-present", "devices-assigned", "dmatest-nested", "dmatest-baseline", "isolation",
                     "stale-iotlb-hazard"]


def _kill_leftovers(owner: subprocess.Popen[bytes], service_pid: int) -> None:
    """A failed test leaves neither the owning process nor its service running."""
    if owner.poll() is None:
        owner.kill()
    if service_pid and Path(f"/proc/{service_pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(service_pid, signal.SIGKILL)


SUPERVISING = """
import sys, time
from pathlib import Path
from pviommu.client.procs import Supervisor
sup = Supervisor(Path(sys.argv[1]), env={"PVIOMMU_ADMIN_TOKEN": "t"})
hv = sup.start("hv", "hypervisor")
print(hv.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not TMPFS, reason="no tmpfs /dev/shm here")
def test_services_end_and_clean_up_when_their_supervisor_is_killed_outright(tmp_path: Path) -> None:
    """What `kill -9` of `pviommu run` (or of a test process using the client) does to its services."""
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISING, str(tmp_path)], stdout=subprocess.PIPE)
    hv_pid = 0
    try:
        assert sup.stdout is not None
        hv_pid = int(sup.stdout.readline())
        rec = json.loads(next(ln for ln in _wait_for(tmp_path / "hv.log", '"hypervisor.serving"').splitlines()
                              if '"hypervisor.serving"' in ln))
        folder = Path(rec["memory_dir"])
        assert folder.exists()
        sup.kill()  # SIGKILL: the supervisor's own cleanup cannot run
        sup.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{hv_pid}").exists() and \
                "zombie" not in Path(f"/proc/{hv_pid}/status").read_text(errors="replace").lower():
            time.sleep(0.1)
        assert not Path(f"/proc/{hv_pid}").exists() or "zombie" in Path(f"/proc/{hv_pid}/status").read_text().lower()
        assert not folder.exists()  # it ended by its own SIGTERM path, which removes its bank folder
    finally:
        _kill_leftovers(sup, hv_pid)


HOSTING = """
import sys, time
from pviommu.client.local import LocalHost
host = LocalHost(guests=0).start()
assert host.hypervisor is not None
print(host.workdir, host.hypervisor.pid, flush=True)
time.sleep(600)
"""


def test_the_work_folder_of_a_local_host_killed_outright_goes_with_the_next_start() -> None:
    """After `kill -9` of `pviommu run` its services stop by themselves, but its logs folder can only be
    removed by somebody else: the next local host."""
    owner = subprocess.Popen([sys.executable, "-c", HOSTING], stdout=subprocess.PIPE)
    hv_pid = 0
    try:
        assert owner.stdout is not None
        workdir_text, pid_text = owner.stdout.readline().decode().split()
        workdir, hv_pid = Path(workdir_text), int(pid_text)
        assert (workdir / "hypervisor.log").exists()
        owner.kill()
        owner.wait(30)
        assert workdir.exists()  # nothing of the killed process could remove it
        nxt = LocalHost(guests=0)
        try:
            assert not workdir.exists()
            assert nxt.workdir.exists()  # and the new host's own folder is kept
        finally:
            nxt.stop()
        assert not nxt.workdir.exists()
    finally:
        _kill_leftovers(owner, hv_pid)
