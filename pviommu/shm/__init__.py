"""Shared-memory transports of the core floor: queues, rings and doorbells between processes."""
