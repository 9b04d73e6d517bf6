"""``granger-mpi supervise``: rerun a training job from its newest good checkpoint until it
completes (the restart path of fault tolerance, for an MPI without ULFM or past its limits).

Success is read from the run's own completion record (``RUN_DIR/COMPLETE``, written by
``train`` after the model is saved), never from mpirun's exit code alone: Open MPI's
mpirun can exit 0 after ranks were lost (docs/architecture.md, "Environment traps").
"""

import os
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

from granger_mpi import config, rundir
from granger_mpi.faults import parse
from granger_mpi.errors import EXIT_BAD_INPUT, EXIT_GAVE_UP, EXIT_STOPPED, UserError

# How a rank starts granger-mpi. ``-P``: not the current directory first on ``sys.path``, as
# plain ``-m`` puts it; an ``argparse.py`` where the job was started must not run on every rank.
RANK_PROGRAM = (sys.executable, "-P", "-m", "granger_mpi")


def launcher(name):
    """The mpirun to use: a path, or a name found beside this Python or else on PATH.

    Beside this Python first: the Open MPI that mpi4py was built for lives in the same
    environment, while PATH may hold another (Debian's Open MPI 4 comes with parallel HDF5).
    """
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise UserError(f"--mpirun {name}: not found (give a path)")
    return found


def clear_stale_session_dir():
    """Remove what a killed mpirun left under this process's pid, in the process that is about
    to become mpirun (through exec, which keeps the pid).

    Open MPI 5 keeps its session files in ``$TMPDIR/ompi.<pid of mpirun>``; an mpirun given
    the pid of one that was killed finds the old rendezvous file there and fails with "The
    PMIx server's listener thread failed to start" (scripts/mpirun does the same).
    """
    shutil.rmtree(Path(tempfile.gettempdir()) / f"ompi.{os.getpid()}", ignore_errors=True)


def supervise(job_path, ranks, *, mpirun="mpirun", mpirun_args=(), train_args=(), max_restarts=3,
              backoff_s=1.0, max_backoff_s=300.0, out=print):
    """Run ``mpirun -n ranks granger-mpi train JOB`` until the run completes; the exit code.

    After a failure the job is started again with ``--resume auto`` (newest checkpoint that
    verifies), at most ``max_restarts`` times, waiting ``backoff_s`` doubled each time, up
    to ``max_backoff_s``.
    Bad input (2) and a requested stop (3) are passed on at once; giving up exits 4.
    """
    job = config.load(job_path)
    run = rundir.RunDir(job.output.run_dir)
    base = [launcher(mpirun), *mpirun_args, "-n", str(ranks), *RANK_PROGRAM, "train", str(job_path)]
    restarts = 0
    extra = list(train_args)
    while True:
        started = time.time()
        code = subprocess.call(base + extra, env=dict(os.environ, GRANGER_ATTEMPT=str(restarts + 1)),
                               preexec_fn=clear_stale_session_dir)
        record = run.completion()
        if record is not None and record.get("finished_at", 0) >= started:
            if code != 0:
                out(f"supervise: mpirun exited {code}, but the run recorded its completion: done")
            return 0
        if code == EXIT_BAD_INPUT:
            return code
        if code == EXIT_STOPPED:
            out("supervise: the run stopped on request after a checkpoint; not restarting")
            return code
        if restarts >= max_restarts:
            out(f"supervise: giving up: the run failed {restarts + 1} time(s) (last exit code {code}), "
                f"--max-restarts {max_restarts}")
            return EXIT_GAVE_UP
        wait = min(max_backoff_s, backoff_s * 2 ** min(restarts, 64))
        restarts += 1
        out(f"supervise: the run failed (exit code {code}); restart {restarts}/{max_restarts} from the "
            f"newest good checkpoint in {wait:.1f} s")
        time.sleep(wait)
        train_args = _for_restart(train_args)    # cumulative: one injection fewer each time
        extra = train_args + ["--resume", "auto"]


def _for_restart(train_args):
    """The arguments of a restart: keep the predecessor's results (no ``--overwrite``), and of
    the injected failures drop the earliest one, which is taken to be what ended that run
    (a ``slow`` one ends nothing and is kept)."""
    kept, specs, args = [], [], iter(train_args)
    for arg in args:
        if arg == "--overwrite":
            continue
        if arg == "--inject-failure":
            specs.append(next(args))
        elif arg.startswith("--inject-failure="):
            specs.append(arg.split("=", 1)[1])
        else:
            kept.append(arg)
    fatal = [spec for spec in specs if parse(spec).mode != "slow"]    # a straggler ends nothing
    if fatal:
        specs.remove(min(fatal, key=lambda spec: parse(spec).step))
    return kept + [f"--inject-failure={spec}" for spec in specs]
