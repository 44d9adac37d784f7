"""docs/api.md is run, not just read: its ``python`` blocks execute in order
as one session against real processes, and the block after a
``<!-- pytest-example -->`` marker runs as a user's test file under pytest in
a folder outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
_BLOCK = re.compile(r"(<!-- pytest-example -->\n)?```python\n(.*?)```", re.S)


def _blocks() -> list[tuple[bool, str]]:
    return [(bool(m.group(1)), m.group(2)) for m in _BLOCK.finditer(DOC.read_text())]


def test_the_guide_has_examples_to_run() -> None:
    blocks = _blocks()
    assert sum(not is_test for is_test, _ in blocks) >= 8 and sum(is_test for is_test, _ in blocks) == 1


def test_the_guides_python_blocks_run_in_order_as_one_session() -> None:
    namespace: dict[str, object] = {"__name__": "api_md"}
    try:
        for i, (is_test, code) in enumerate(_blocks()):
            if not is_test:
                exec(compile(code, f"docs/api.md block {i + 1}", "exec"), namespace)
    finally:
        system = namespace.get("system")
        close = getattr(system, "close", None)
        if callable(close):
            close()


def test_the_guides_plugin_example_passes_as_a_user_test(tmp_path: Path) -> None:
    code = next(code for is_test, code in _blocks() if is_test)
    (tmp_path / "test_from_the_guide.py").write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PVIOMMU_"))}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "2 passed" in out.stdout
