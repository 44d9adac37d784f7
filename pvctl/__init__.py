"""Floor 3: the ``pviommu`` command. It starts, orchestrates and talks to the
services, so it sits above all of them (docs/design.md)."""
