"""Triton backend of mitkernels: the four kernels of the op contract (``mitkernels/ops.py``).

The kernels and their launchers live in :mod:`mitkernels.triton.mit_loss`; ``_backends.py`` imports
that module lazily, so importing this package never requires a GPU.
"""
