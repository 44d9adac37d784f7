"""See the package docstring of guest_agent."""
