"""The exit codes of the ``pviommu`` command and its services (docs/cli.md).

They follow grpcurl and grpc_health_probe where those apply: a failed RPC
exits with 64 + its gRPC status code (grpcurl), ``pviommu grpc health``
exits 2 when it cannot connect, 3 when the RPC fails and 4 when the service
is not SERVING (grpc_health_probe), and a command stopped by a signal exits
with 128 + the signal number, as shells report it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

OK = 0
#: The job ran and failed: dmatest failures, a failed scenario step, a replay
#: mismatch, or an in-band failure when --fail-on-status asks for it.
FAILED = 1
#: Bad command line or input (unknown field, malformed JSON, bad size), or
#: nothing answered at the address (grpc_health_probe's "connection failure").
USAGE = 2
CONNECT = 2
#: ``serve guest``: no para-virtual IOMMU offered (and --allow-no-iommu not given).
NO_IOMMU = 3
#: ``grpc health``: the health RPC itself failed (grpc_health_probe).
HEALTH_RPC_FAILED = 3
#: ``grpc health``: the service answered, but not SERVING (grpc_health_probe).
UNHEALTHY = 4
#: A service could not start: its address is in use or cannot be bound.
CANNOT_BIND = 5
#: A failed RPC exits with RPC_BASE + the gRPC status code (grpcurl).
RPC_BASE = 64
#: Stopped by signal N: 128 + N (130 Ctrl-C, 129 SIGHUP, 143 SIGTERM).
SIGNAL_BASE = 128


def for_signal(signum: int) -> int:
    return SIGNAL_BASE + signum


def usage_exit(message: str) -> NoReturn:
    """End a command on a user error (a missing credential, a file it cannot
    read): ``message`` as one line on stderr, exit code USAGE, no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(USAGE)


def read_secret(path: str, who: str, what: str) -> str:
    """The stripped contents of a token file, or ``usage_exit`` naming it."""
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        usage_exit(f"{who}: cannot read the {what} file {path}: {exc.strerror or exc}")
