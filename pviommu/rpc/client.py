"""Client channels: wait for the server (saying so), attach the bearer token."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import grpc

from pviommu.rpc.auth import BearerClientInterceptor
from pviommu.rpc.server import SERVER_OPTIONS

#: Seconds of silence before the first "waiting for ..." line, then between lines.
WAIT_NOTICE_AFTER = 1.0
WAIT_NOTICE_EVERY = 5.0


def print_waiting(message: str) -> None:
    """The default ``on_wait``: one line on stderr (services and the CLI)."""
    print(message, file=sys.stderr, flush=True)


def wait_ready(channel: grpc.Channel, address: str, timeout: float | None, *, what: str = "a gRPC server",
               on_wait: Callable[[str], None] | None = None) -> None:
    """Block until ``channel`` is connected; ``on_wait`` gets a
    ``"waiting for <what> at <address> (3s of 60s) ..."`` line after a second
    of silence and every few seconds after. Raises ConnectionError naming
    the address when ``timeout`` passes."""
    future = grpc.channel_ready_future(channel)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    next_notice = started + WAIT_NOTICE_AFTER
    while True:
        now = time.monotonic()
        step = next_notice - now if on_wait is not None else float("inf")
        if deadline is not None:
            step = min(step, deadline - now)
        try:
            future.result(timeout=max(0.0, step) if step != float("inf") else None)
            return
        except grpc.FutureTimeoutError:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                future.cancel()
                raise ConnectionError(f"no gRPC server answered at {address} within {timeout:g}s") from None
            if on_wait is not None and now >= next_notice:
                budget = f" of {timeout:g}s" if timeout is not None else ""
                on_wait(f"waiting for {what} at {address} ({now - started:.0f}s{budget}) ...")
                next_notice = now + WAIT_NOTICE_EVERY


def connect(address: str, token: str | None = None, *, ready_timeout: float | None = 10.0,
            what: str = "a gRPC server", on_wait: Callable[[str], None] | None = None) -> grpc.Channel:
    """An insecure channel to ``address`` carrying ``token`` on every call.

    With ``ready_timeout`` it waits until the server answers, so a service
    started a moment ago is not reported as down (``on_wait`` hears about a
    long wait, see ``wait_ready``); it raises ConnectionError with the
    address when the server never comes up."""
    channel = grpc.insecure_channel(address, options=SERVER_OPTIONS)
    if ready_timeout is not None:
        try:
            wait_ready(channel, address, ready_timeout, what=what, on_wait=on_wait)
        except BaseException:
            channel.close()
            raise
    if token:
        return grpc.intercept_channel(channel, BearerClientInterceptor(token))
    return channel
