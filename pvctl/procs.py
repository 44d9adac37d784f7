"""The process supervisor lives in the client now (``pviommu.client.procs``,
so ``System.start_local`` can use it without importing the command line);
this module keeps the old import path for the CLI, benchmarks and tests."""

from pviommu.client.procs import ServiceProcess, ServiceStartError, Supervisor, serve_command

__all__ = ["ServiceProcess", "ServiceStartError", "Supervisor", "serve_command"]
