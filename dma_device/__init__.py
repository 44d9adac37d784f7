"""The DSA device emulator service (floor 2): a pure device model in ``dsa/``
and, later, the gRPC portal in ``rpc/`` that only decodes, calls and encodes."""
