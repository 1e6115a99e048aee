"""mitkernels: fused kernels for the MiT loss family (MiT, TET, CCT-EAL)."""
__version__ = "0.1.0"
