"""Threads per rank: how many cores each rank's kernels may use.

Ranks that share a node share its cores, so the default is ``cores // ranks_on_node``
(at least 1): more would make ranks fight for cores, fewer would leave cores idle. BLAS
reads its thread count once, when it is loaded, so the CLI sets the environment before
numpy is imported (``cli._default_threads``); numba's count is set here at run time.
"""

import os

from mpi4py import MPI


def ranks_on_node(comm, counted=True):
    """How many ranks of ``comm`` that are ``counted`` (idle spares are not) share this
    rank's node (collective over ``comm``)."""
    import numpy as np      # not at the top: the CLI imports this module before numpy
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        here = np.array([1 if counted else 0], np.int64)
        node.Allreduce(MPI.IN_PLACE, here, op=MPI.SUM)
        return int(here[0])
    finally:
        node.Free()


def default_threads(cores, ranks_here):
    """``cores // ranks_here``, at least 1."""
    return max(1, cores // max(1, ranks_here))


def configure(comm, requested=None, spare=False):
    """Set numba's threads for this rank; returns the number. Collective over ``comm``.

    ``requested`` (``[train].threads_per_rank``) wins; otherwise the node's cores (this
    process's CPU affinity) are shared by its training ranks (an idle ``spare`` takes no
    share: it gets its count when it takes a place, ``use``).
    """
    here = ranks_on_node(comm, counted=not spare)
    return use(requested or default_threads(len(os.sched_getaffinity(0)), here))


def use(threads):
    """Numba's thread count for this rank, capped at the pool it started with
    (``NUMBA_NUM_THREADS``); returns it."""
    import numba
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    return threads
