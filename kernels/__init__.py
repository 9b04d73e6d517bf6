"""Numba-jitted numeric kernels: pure functions on arrays. No MPI, no HDF5, no I/O."""
