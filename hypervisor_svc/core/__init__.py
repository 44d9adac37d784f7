"""The hypervisor's logic, free of gRPC: state, stage 2 and the hypercalls."""
