"""Thin gRPC servicers over ``hypervisor_svc.core``."""
