"""Floor 2: the hypervisor service.

It is the only writer of stage-2 tables and device context entries and the
only judge of who may do what: partitions and their RAM banks, device
assignment, the guest IOMMU hypercalls and their invalidations, the fault log.
``core/`` is plain Python (no gRPC); ``rpc/`` translates messages to it.
"""
