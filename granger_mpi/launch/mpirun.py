"""``granger-mpi run``: start ``mpirun`` with the flags a job's fault mode needs.

Users should not have to remember that ULFM wants ``--with-ft ulfm --mca pml ob1 --mca btl
tcp,self`` (docs/architecture.md, "Environment traps"), nor how to tune its failure detector. ``run`` builds the command
from the job file's ``[fault].mode``, shows it, and runs it once or under ``supervise``.
"""

import os
import shlex
import sys

from granger_mpi import config
from granger_mpi.launch import supervise
from granger_mpi.mpi import ulfm


def detector_flags(timeout_s):
    """Open MPI's heartbeat failure detector: a peer silent for ``timeout_s`` is declared dead.

    A killed process is reported at once by its daemon; the heartbeats matter when a whole
    node (daemon included) goes quiet. The period is a quarter of the timeout, as Open MPI
    requires the timeout to exceed three periods.
    """
    return ("--mca", "mpi_ft_detector", "true", "--mca", "mpi_ft_detector_thread", "true",
            "--mca", "mpi_ft_detector_period", f"{timeout_s / 4:g}",
            "--mca", "mpi_ft_detector_timeout", f"{timeout_s:g}")


def mpirun_flags(job, ranks, *, hostfile=None, detector_timeout_s=None, extra=()):
    """The launcher flags (without the program) for ``ranks`` ranks of ``job``."""
    flags = []
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    if hostfile:
        flags += ["--hostfile", str(hostfile)]
    elif ranks > len(os.sched_getaffinity(0)):
        flags.append("--oversubscribe")
    if job.fault.mode != "restart":
        flags += ulfm.LAUNCH_FLAGS
        if detector_timeout_s:
            flags += detector_flags(detector_timeout_s)
    return flags + list(extra)


def run(job_path, ranks, *, spares=None, mpirun="mpirun", hostfile=None, detector_timeout_s=None,
        mpirun_args=(), train_args=(), max_restarts=0, backoff_s=1.0, max_backoff_s=300.0, dry_run=False,
        out=print):
    """Launch the job on ``ranks`` training ranks and ``spares`` spare ranks (default
    ``[fault].spares``); returns the exit code (``mpirun``'s, or ``supervise``'s with restarts)."""
    job = config.load(job_path)
    if spares is not None:
        job = config.with_spares(job, spares)
        train_args = (*train_args, "--spares", str(spares))
    ranks += job.fault.spares
    flags = mpirun_flags(job, ranks, hostfile=hostfile, detector_timeout_s=detector_timeout_s,
                         extra=mpirun_args)
    command = [supervise.launcher(mpirun), *flags, "-n", str(ranks), *supervise.RANK_PROGRAM,
               "train", str(job_path), *train_args]
    out(f"run: {shlex.join(command)}" + (f" (restarted from checkpoints up to {max_restarts} "
                                          f"time(s))" if max_restarts else ""))
    if dry_run:
        return 0
    sys.stdout.flush()
    if max_restarts:
        return supervise.supervise(job_path, ranks, mpirun=mpirun, mpirun_args=flags,
                                   train_args=train_args, max_restarts=max_restarts,
                                   backoff_s=backoff_s, max_backoff_s=max_backoff_s, out=out)
    supervise.clear_stale_session_dir()
    os.execv(command[0], command)
