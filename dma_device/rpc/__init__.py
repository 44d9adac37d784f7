"""Thin gRPC layer over the DSA model and its IOMMU unit."""
