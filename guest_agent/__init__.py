"""The guest agent: one guest's para-virtual IOMMU driver, DMA layer, DSA driver and dmatest.

Floors inside the package (every import points down): ``driver/`` talks to the
hypervisor and owns domains and their stage-1 tables, ``dma/`` is the DMA API
drivers use, ``dsa/`` is the DSA driver and dmatest on top of the DMA API,
``rpc/`` is the gRPC glue, ``main.py`` the ``pviommu serve guest`` command.
"""
