"""Host physical memory: banks of shared memory, and typed access to them."""
