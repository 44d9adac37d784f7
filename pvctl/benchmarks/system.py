"""The real services a benchmark measures against: a local virtual system
(hypervisor and device processes) and a guest driver stack in this process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def virtual_system(quick: bool) -> Iterator[Any]:
    from pvctl.local import VirtualSystem

    system = VirtualSystem(guests=0, devices_per_guest=1, memory_bytes=(128 if quick else 256) << 20,
                           hypervisor_args=["--s2-baseline"])  # the baseline rows need the S2 option
    try:
        system.start()
        yield system
    except BaseException:
        sys.stderr.write(system.logs() + "\n")
        raise
    finally:
        system.stop()


@contextmanager
def local_agent(system: Any, name: str) -> Iterator[Any]:
    """A guest driver stack in this process, on a partition of its own with one DSA device."""
    from guest_agent.agent import Agent, open_bank
    from pviommu.rpc.client import connect

    part = system.add_partition(90, name=name)
    channel = connect(system.hypervisor.address, part.token)
    agent = Agent(channel, part.token, open_bank(part.bank_path))
    try:
        agent.start()
        yield agent
    finally:
        agent.close()
        channel.close()
