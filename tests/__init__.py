"""pviommu's test suites; ``tests.kit`` holds what they share (pytest puts the
repository root on ``sys.path``: ``pythonpath`` in pyproject.toml)."""
