"""Threads per rank: how many cores each rank's kernels may use.

Ranks that share CPUs share them out, so the default is ``usable CPUs // ranks sharing
them`` (at least 1): more would make ranks fight for cores, fewer would leave cores idle.
Which ranks share CPUs is decided by what the kernel says, not by host names (emulated or
containerised hosts on one machine have names of their own): ranks share when they run
under the same kernel (its boot id) with the same CPU affinity. A process's usable CPUs are
its affinity, capped by its cgroup's CPU quota.

BLAS reads its thread count when it is loaded, so the CLI sets a first guess in the
environment before numpy is imported (``cli._default_threads``); ``use`` sets the final
count at run time, for numba and (unless the user set it) for the BLAS libraries loaded.
"""

import math
import os
import zlib
from pathlib import Path

from mpi4py import MPI

CGROUP = Path("/sys/fs/cgroup")
BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Set by the CLI when the BLAS thread count in the environment is its guess, not the user's:
# only then does ``use`` change it.
blas_guessed = False
ranks_here = 1     # the training ranks sharing this rank's CPUs, as ``configure`` counted them


def cgroup_cpus(root=CGROUP):
    """CPUs the cgroup's quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over the
    period), rounded up; None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota, period = int(quota), int(period)
    except ValueError:      # "max": no quota
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def usable_cpus():
    """The CPUs this process may use: its affinity, capped by its cgroup's quota."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpus()
    return min(cpus, quota) if quota else cpus


def sharing_key():
    """Equal on processes that share CPUs: the kernel's boot id and the affinity mask."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = MPI.Get_processor_name()
    return f"{boot} {sorted(os.sched_getaffinity(0))}"


def ranks_sharing_cpus(comm, counted=True):
    """How many ranks of ``comm`` that are ``counted`` (idle spares are not) share this
    rank's CPUs (collective over ``comm``)."""
    import numpy as np      # not at the top: the CLI imports this module before numpy
    group = comm.Split(zlib.crc32(sharing_key().encode()) & 0x7FFFFFFF, key=comm.Get_rank())
    try:
        here = np.array([1 if counted else 0], np.int64)
        group.Allreduce(MPI.IN_PLACE, here, op=MPI.SUM)
        return int(here[0])
    finally:
        group.Free()


def default_threads(cores, ranks_here):
    """``cores // ranks_here``, at least 1."""
    return max(1, cores // max(1, ranks_here))


def configure(comm, requested=None, spare=False):
    """Set this rank's kernel threads; returns the number. Collective over ``comm``.

    ``requested`` (``[train].threads_per_rank``) wins; otherwise the usable CPUs are shared
    by the training ranks that share them (an idle ``spare`` takes no share: it gets its
    count when it takes a place, ``use``).
    """
    global ranks_here
    ranks_here = ranks_sharing_cpus(comm, counted=not spare)
    return use(requested or default_threads(usable_cpus(), ranks_here))


def core_free_for_exchange(threads):
    """Whether this rank's share of the CPUs (as ``configure`` found the ranks sharing them)
    leaves a core for a communication thread beside its ``threads`` compute threads."""
    return usable_cpus() >= (threads + 1) * max(1, ranks_here)


def use(threads):
    """This rank's thread count for numba (capped at the pool it started with,
    ``NUMBA_NUM_THREADS``) and the BLAS libraries; returns it."""
    import numba
    import scipy.linalg.cython_blas   # noqa: F401  numba's BLAS: loaded now, so that it is limited too
    from threadpoolctl import threadpool_limits
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    if blas_guessed:
        threadpool_limits(threads, user_api="blas")
    return threads


def blas_in_use():
    """The BLAS libraries loaded, as ``openblas 0.3.30 x 2 threads`` (for the run's log)."""
    from threadpoolctl import threadpool_info
    found = sorted({f"{lib['internal_api']} {lib.get('version') or ''} x {lib['num_threads']} threads"
                    for lib in threadpool_info() if lib["user_api"] == "blas"})
    return ", ".join(found) or "none loaded"
