"""Page tables written once over small formats (after Linux generic_pt).

``common`` holds the vocabulary and the ``PtFormat`` protocol, ``fmt/`` the
formats (x86-64 / VT-d first stage, VT-d second stage), ``walk`` the one
``PageTable`` (map / unmap / lookup) and ``gather`` the unmap gather.
"""
