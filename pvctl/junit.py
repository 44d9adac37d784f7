"""JUnit XML reports (``--junit-xml FILE``) for CI systems that show test results.

The common subset every consumer reads (Jenkins, GitLab, GitHub actions
reporters): one ``<testsuite>`` with ``tests``/``failures``/``errors``/``time``,
``<testcase name classname time>`` with an optional ``<failure message>`` or
``<error message>``, and ``<properties>`` for the run's configuration.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Case:
    name: str
    seconds: float = 0.0
    failure: str | None = None  # the job ran and failed
    error: str | None = None  # the job could not run
    output: str = ""


def write(path: str | Path, suite: str, cases: list[Case], properties: Mapping[str, object] | None = None) -> Path:
    failures = sum(1 for c in cases if c.failure is not None)
    errors = sum(1 for c in cases if c.error is not None and c.failure is None)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures),
                       errors=str(errors), time=f"{sum(c.seconds for c in cases):.3f}")
    if properties:
        props = ET.SubElement(ts, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", name=key, value="" if value is None else str(value))
    for c in cases:
        tc = ET.SubElement(ts, "testcase", name=c.name, classname=suite, time=f"{c.seconds:.3f}")
        if c.failure is not None:
            ET.SubElement(tc, "failure", message=c.failure.splitlines()[0] if c.failure else "failed").text = c.failure
        elif c.error is not None:
            ET.SubElement(tc, "error", message=c.error.splitlines()[0] if c.error else "error").text = c.error
        if c.output:
            ET.SubElement(tc, "system-out").text = c.output
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
    return out
