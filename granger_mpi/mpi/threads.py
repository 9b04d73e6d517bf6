"""Threads per rank: how many cores each rank's kernels may use.

Ranks that share a node share its cores, so the default is ``cores // ranks_on_node``
(at least 1): more would make ranks fight for cores, fewer would leave cores idle. BLAS
reads its thread count once, when it is loaded, so the CLI sets the environment before
numpy is imported (``cli._default_threads``); numba's count is set here at run time.
"""

import os

from mpi4py import MPI


def ranks_on_node(comm):
    """How many ranks of ``comm`` share this rank's node (collective over ``comm``)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_size()
    finally:
        node.Free()


def default_threads(cores, ranks_here):
    """``cores // ranks_here``, at least 1."""
    return max(1, cores // max(1, ranks_here))


def configure(comm, requested=None):
    """Set numba's threads for this rank; returns the number. Collective over ``comm``.

    ``requested`` (``[train].threads_per_rank``) wins; otherwise the node's cores (this
    process's CPU affinity) are shared by its ranks. Numba cannot go above the pool it
    started with (``NUMBA_NUM_THREADS``), so the count is capped there.
    """
    import numba
    here = ranks_on_node(comm)
    threads = requested or default_threads(len(os.sched_getaffinity(0)), here)
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    return threads
