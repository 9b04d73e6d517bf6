"""``granger-mpi``: the command line. The only module that touches ``MPI.COMM_WORLD``."""

import argparse
import faulthandler
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

EPILOG = """\
exit codes:
  0  success
  1  failure: a check failed, a rank crashed or an internal error (traceback shown)
  2  bad input: job file, dataset, argument or run directory; one line names the culprit,
     and nothing was written
  3  stopped on request (SIGTERM to the ranks, or a file RUN_DIR/STOP) after writing a
     checkpoint; continue with --resume auto
  4  supervise gave up: the run kept failing and --max-restarts were used up
  5  ranks died past the [fault] limits (or ULFM is off); a checkpoint was kept: restart
     with --resume auto (supervise does)
  6  the watchdog found a step, checkpoint or recovery stuck, reported it and aborted

Run under MPI as `mpirun -n 4 granger-mpi train job.toml`; commands also run without mpirun
(one rank). Signals (to mpirun, which forwards them, or to every rank): SIGUSR1 saves a
checkpoint at the next step and goes on (after the last step it is ignored); SIGUSR2 prints
every thread's Python stack, e.g. when a job seems stuck. SIGTERM to the ranks (not to
mpirun, which kills them soon after) saves and stops.
"""


def _default_threads(requested=None):
    """A first guess at the BLAS threads per rank, set before numpy/numba are imported (BLAS
    reads its count once, when loaded): the usable CPUs shared by the ranks the launcher
    counts on this host. ``threads.configure`` sets the final count once MPI can tell which
    ranks really share CPUs. ``requested`` is the job's ``[train].threads_per_rank``, if any.
    Explicit settings in the environment win.
    """
    from granger_mpi.mpi import threads as rank_threads     # imports no numpy
    ranks_here = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")     # Open MPI
                     or os.environ.get("MPI_LOCALNRANKS")                # MPICH's hydra
                     or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    cpus = rank_threads.usable_cpus()
    threads = str(requested or rank_threads.default_threads(cpus, ranks_here))
    rank_threads.blas_guessed = not any(os.environ.get(v) for v in rank_threads.BLAS_VARIABLES)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    # numba's pool: the most a rank may be given once the ranks sharing its CPUs are known.
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(int(threads), cpus)))


def _requested_threads(args):
    """``[train].threads_per_rank`` of a train job, read early (before numpy is imported).

    Only a hint for the environment: the job file is checked properly later, and any
    problem here is left for that check to report.
    """
    if getattr(args, "command", None) != "train":
        return None
    try:
        import tomllib
        value = tomllib.loads(Path(args.job).read_text()).get("train", {}).get("threads_per_rank")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024 else None


def _world():
    from granger_mpi.mpi.runtime import world
    return world()


def cmd_train(args):
    """Train a model as the job file says."""
    from granger_mpi import api, config, faults
    from granger_mpi.mpi.runtime import agree
    from granger_mpi.training.setup import Hooks
    # SIGUSR1 is ignored from the package's first statement (granger_mpi/__init__.py) until
    # the loop's handler, which restores that; also here, for a caller of cli.main().
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    world = _world()
    injections = agree(world, lambda: [faults.parse(text) for text in args.inject_failure])
    job = agree(world, config.load, args.job, args.run_dir)
    if args.spares is not None:
        job = agree(world, config.with_spares, job, args.spares)
    hooks = Hooks(injections=tuple(injections), row_log_dir=args.row_log,
                  checkpoint_write_fails_at=args.fail_checkpoint_write)
    summary = api.train(world, job, resume=args.resume, overwrite=args.overwrite, log=_print_flushed,
                        hooks=hooks, abort=world.Abort)
    if summary.ranks_lost:
        # MPI_Finalize can hang once peers have died (seen across hosts); the run's
        # completion is already recorded, so the process ends here, output flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(summary.exit_code)
    return summary.exit_code


def _print_flushed(message):
    """The training log: rank 0's lines, in order with the progress lines."""
    print(message, flush=True)


def cmd_status(args):
    """Per-rank state of a run."""
    import json
    import time

    from granger_mpi.observe import status
    from granger_mpi.errors import UserError
    if args.json:
        records = status.read_all(args.run_dir)
        if not records:
            raise UserError(f"{args.run_dir}: no status files in {status.status_dir(args.run_dir)}")
        print(json.dumps(records, indent=1))
        return 0
    while True:
        text, live = status.table(args.run_dir)
        if text is None:
            raise UserError(f"{args.run_dir}: no status files in {status.status_dir(args.run_dir)} "
                            f"(not a run directory, or the run has not started)")
        print(text, flush=True)
        if args.watch is None or not live:
            return 0 if live else 1
        time.sleep(args.watch)
        print()


def cmd_evaluate(args):
    """Loss and accuracy of a saved model on a dataset."""
    from granger_mpi import api
    from granger_mpi.mpi.runtime import say
    comm = _world()
    loss, accuracy = api.evaluate(comm, args.model, args.dataset)
    acc = "" if accuracy is None else f" accuracy {100 * accuracy:.2f}%"
    say(comm, f"{args.dataset}: {_rows(args.dataset)} rows, loss {loss:.6f}{acc}")
    return 0


def _rows(path):
    from granger_mpi.data import dataset
    return dataset.open_info(path).n_rows


def cmd_predict(args):
    """Predictions of a saved model or checkpoint for every row of a dataset, as HDF5."""
    from granger_mpi import api
    from granger_mpi.mpi.runtime import say
    comm = _world()
    n_rows = api.predict(comm, args.model, args.dataset, args.output)
    say(comm, f"wrote {args.output}: predictions for {n_rows:,} rows of {args.dataset}")
    return 0


def cmd_make_dataset(args):
    """Write a seeded synthetic dataset (in parallel under mpirun)."""
    from granger_mpi.data import dataset
    from granger_mpi.errors import UserError
    from granger_mpi.mpi.runtime import agree, say
    comm = _world().Dup()

    def check():
        if not 1 <= args.rows <= 10**9:
            raise UserError(f"--rows must be between 1 and 10^9, got {args.rows}")
        if args.features < 1 or args.classes < 2 or args.targets < 1 or args.clusters < 1:
            raise UserError("--features, --targets and --clusters must be >= 1, --classes >= 2")
        if args.test_rows < 0:
            raise UserError(f"--test-rows must be >= 0, got {args.test_rows}")
        if not args.output.parent.is_dir():
            raise UserError(f"output directory {args.output.parent} does not exist")
    agree(comm, check)
    problem = dataset.SyntheticProblem(args.task, args.features, args.classes, args.targets,
                                       args.clusters, args.separation, args.seed)
    outputs = [(args.output, args.rows, 0)]
    if args.test_rows:
        outputs.append((test_path_for(args.output), args.test_rows, 1))
    for path, rows, stream in outputs:
        dataset.write_synthetic(comm, path, problem, rows, stream)
        say(comm, f"wrote {path}: {rows:,} rows x {args.features} features, {args.task}"
                  + (f", {args.classes} classes" if args.task == "classification" else ""))
    comm.Free()
    return 0


def test_path_for(path):
    """``data/train.h5`` -> ``data/train-test.h5``."""
    return path.with_name(f"{path.stem}-test{path.suffix}")


def cmd_import_dataset(args):
    """Convert .npz, .npy or .csv into a granger-mpi dataset (serial)."""
    from granger_mpi.data import importers
    comm = _world()
    if comm.Get_rank() == 0:
        n_rows = importers.import_file(args.source, args.output, labels=args.labels,
                                       label_column=args.label_column, task=args.task,
                                       x_key=args.x_key, y_key=args.y_key)
        print(f"wrote {args.output}: {n_rows:,} rows from {args.source}", flush=True)
    return 0


def _progress_line(comm, what, every_s=5.0):
    """A callback ``(done, total)`` that prints ``what``'s progress on rank 0 every few seconds."""
    import time
    started = last = time.monotonic()

    def progress(done, total):
        nonlocal last
        now = time.monotonic()
        if comm.Get_rank() == 0 and now - last >= every_s:
            last = now
            print(f"{what}: {done:,} of {total:,} blocks on rank 0 ({now - started:.0f} s)", flush=True)
    return progress


def cmd_dataset_checksum(args):
    """Add per-block checksums to a dataset file (in parallel under mpirun)."""
    import h5py
    from granger_mpi.data import dataset, integrity
    from granger_mpi.mpi.runtime import agree, say
    comm = _world()
    agree(comm, dataset.open_info, args.file)
    with h5py.File(args.file, "r+", driver="mpio", comm=comm) as f:
        integrity.add(f, comm, _progress_line(comm, "checksum"))
        blocks, rows = f[integrity.GROUP]["X"].shape[0], int(f[integrity.GROUP].attrs["block_rows"])
    say(comm, f"{args.file}: wrote checksums of {blocks:,} blocks of {rows:,} rows")
    return 0


def cmd_dataset_verify(args):
    """Check every block of a dataset file against its checksums (parallel under mpirun)."""
    from granger_mpi.data import dataset, integrity
    from granger_mpi.errors import UserError
    from granger_mpi.mpi.runtime import agree, say
    comm = _world()
    agree(comm, dataset.open_info, args.file)
    found = integrity.verify(comm, args.file, _progress_line(comm, "verify"))
    if found is None:
        raise UserError(f"{args.file} has no checksums; add them with "
                        f"granger-mpi dataset checksum {args.file}", agreed=True)
    blocks, damaged, messages = found
    for message in messages:
        say(comm, message, file=sys.stderr)
    say(comm, f"{args.file}: {blocks - damaged:,} of {blocks:,} blocks intact"
              + (f", {damaged} damaged" if damaged else ""))
    return 1 if damaged else 0


def cmd_inspect(args):
    """Describe, verify or compare checkpoints and model files (no MPI needed)."""
    from granger_mpi.tools import inspect
    return inspect.main(args)


def cmd_plot(args):
    """PNG charts of a run (no MPI needed)."""
    from granger_mpi.tools import plots, runfiles
    record = runfiles.read_run(args.run_dir)
    out_dir = args.out or args.run_dir / "plots"
    charts = plots.write_plots(record, out_dir)
    for chart in charts:
        print(out_dir / chart.file_name)
    print(f"{out_dir / 'index.txt'}: what each chart shows, and what is not recorded")
    return 0


def cmd_report(args):
    """One self-contained HTML page about a run (no MPI needed)."""
    from granger_mpi.tools import report, runfiles
    record = runfiles.read_run(args.run_dir)
    print(report.write_report(record, args.out or args.run_dir / "report.html"))
    return 0


def cmd_compare(args):
    """Runs side by side (no MPI needed)."""
    from granger_mpi.tools import compare
    return compare.main(args.run_dirs, args.out, as_json=args.json)


def cmd_dashboard(args):
    """A live page of a run (no MPI needed)."""
    from granger_mpi.tools import dashboard
    return dashboard.serve(args.run_dir, host=args.host, port=args.port)


def cmd_model(args):
    """Fit the cost model to the benchmark CSVs and project step time to many ranks."""
    from granger_mpi.tools import scaling
    from granger_mpi.errors import UserError
    try:
        sizes = tuple(int(v) for v in args.sizes.split(","))
        ranks = tuple(int(v) for v in args.ranks.split(","))
    except ValueError:
        raise UserError(f"--sizes and --ranks take comma-separated integers, got {args.sizes!r}, "
                        f"{args.ranks!r}") from None
    networks = args.network.split(",")
    unknown = [n for n in networks if n != "local" and n not in scaling.NETWORKS]
    if len(sizes) < 2 or min(sizes) < 1 or min(ranks) < 1 or unknown or min(args.batch, args.per_rank_batch) < 1 \
            or args.read_us_per_row < 0:
        raise UserError(f"need --sizes of at least 2 positive widths, positive --ranks, --batch "
                        f"and --per-rank-batch, --read-us-per-row >= 0, --network among local,{','.join(scaling.NETWORKS)} (got {unknown or ''})")
    if args.steps:
        from granger_mpi.tools import stepmodel
        print(stepmodel.report(args.bench, args.steps, sizes, args.batch,
                               args.kernels or args.bench / "stepmodel_kernels.csv",
                               len(os.sched_getaffinity(0))))
        return 0
    print(scaling.report(args.bench, sizes, args.batch, ranks, networks,
                         per_rank_batch=args.per_rank_batch, read_s_per_row=args.read_us_per_row * 1e-6))
    return 0


def cmd_supervise(args):
    """Run a training job under mpirun and restart it from checkpoints until it completes."""
    from granger_mpi.launch import supervise
    return supervise.supervise(args.job, args.ranks, mpirun=args.mpirun, mpirun_args=args.mpirun_arg,
                               train_args=(["--overwrite"] if args.overwrite else []) + _passed_on(args),
                               max_restarts=args.max_restarts, backoff_s=args.backoff,
                               max_backoff_s=args.max_backoff)


def cmd_run(args):
    """Start mpirun with the flags the job's fault mode needs."""
    from granger_mpi.launch import mpirun as launch
    train_args = (["--overwrite"] if args.overwrite else []) + \
        (["--resume", args.resume] if args.resume else []) + _passed_on(args)
    return launch.run(args.job, args.ranks, spares=args.spares, mpirun=args.mpirun, hostfile=args.hostfile,
                      detector_timeout_s=args.detector_timeout, mpirun_args=args.mpirun_arg,
                      train_args=train_args, max_restarts=args.max_restarts,
                      backoff_s=args.backoff, max_backoff_s=args.max_backoff, dry_run=args.dry_run)


def cmd_doctor(args):
    """Check the installation and print what is loaded."""
    from granger_mpi.tools import doctor
    return doctor.run(_world(), require_ulfm=args.require_ulfm)


def cmd_bench_allreduce(args):
    """Time every allreduce algorithm side by side."""
    from granger_mpi.tools import bench
    return bench.main_allreduce(_world(), args)


def cmd_bench_calibrate(args):
    """Measure every algorithm and store the table that ``auto`` uses."""
    from granger_mpi.tools import bench
    return bench.main_calibrate(_world(), args)


def cmd_bench_checkpoint(args):
    """Checkpoint write bandwidth against dd with fsync."""
    from granger_mpi.tools import bench
    return bench.main_checkpoint(_world(), args)


def _add_injections_for_restarts(p):
    """``--inject-failure`` of the commands that restart ``train`` (run, supervise)."""
    p.add_argument("--inject-failure", action="append", default=[], metavar="SPEC",
                   help="as for train; each restart drops the earliest-step one (taken to "
                        "be what ended the run before)")
    _add_row_log(p)


def _add_row_log(p):
    """A test seam: every rank logs the rows of each step it starts into DIR (not in --help)."""
    p.add_argument("--row-log", type=Path, metavar="DIR", help=argparse.SUPPRESS)


def _passed_on(args):
    """The arguments that ``run`` and ``supervise`` hand to every ``train`` they start."""
    return ([f"--inject-failure={spec}" for spec in args.inject_failure]
            + ([f"--row-log={args.row_log}"] if args.row_log else []))


def build_parser():
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="granger-mpi", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Data-parallel training on MPI clusters: Numba kernels, hand-written "
                    "collectives, parallel HDF5.", epilog=EPILOG)
    from granger_mpi import __version__
    parser.add_argument("--version", action="version", version=f"granger-mpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, description=None):
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("train", cmd_train, "train a model as a TOML job file says",
            "Train a model as a TOML job file says (see jobs/demo.toml); paths in the job file "
            "are relative to the job file. Writes RUN_DIR/model.h5, metrics.h5 and job.toml.")
    p.add_argument("job", type=Path, help="job file (TOML)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results (and checkpoints) of an earlier run in the same run_dir")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from a checkpoint: 'auto' takes the newest one in RUN_DIR/ckpt "
                        "that verifies (or starts fresh if there is none), PATH a given file")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="write the run here instead of the job file's [output].run_dir "
                        "(jobs/train.sbatch keys it by the Slurm job name)")
    p.add_argument("--inject-failure", action="append", default=[], metavar="SPEC",
                   help="make a rank fail on purpose, for tests and demos (repeatable): "
                        "rank=R,step=S[,mode=exit|kill9|hang|slow][,at=compute|allreduce|checkpoint|report|"
                        "validation|end|recovery]"
                        "[,seconds=T]; R is the rank in MPI_COMM_WORLD, S the step index (for "
                        "at=checkpoint the checkpoint of S completed steps); default mode kill9, "
                        "at compute; slow stalls T seconds (default 1) and goes on: a straggler; "
                        "rank=* is every rank, and step=* (slow only) every step: a throttle")
    p.add_argument("--spares", type=int, metavar="S", default=None,
                   help="of the ranks launched, the last S wait idle and take the place of a "
                        "training rank that dies (ULFM; overrides [fault].spares)")
    _add_row_log(p)
    # a test seam: the checkpoint of this step fails as on a full disk (not in --help)
    p.add_argument("--fail-checkpoint-write", type=int, metavar="STEP", help=argparse.SUPPRESS)

    p = add("status", cmd_status, "per-rank state of a run, live or after it ended (no MPI needed)",
            "Print who is alive, each rank's state (IDLE, STARTING, TRAINING, AGGREGATING, CHECKPOINTING, "
            "VALIDATING, FAILED, RECOVERING, FINISHING; SPARE for an idle spare rank), step, time in that state and last heartbeat, from the files "
            "RUN_DIR/status/rank-N.json that every rank refreshes each [fault].status_interval_s. "
            "A rank without a heartbeat for 3 intervals shows as LOST?. Exit code 0 while the run "
            "is live, 1 when no rank is running, 2 when there is no status to show.")
    p.add_argument("run_dir", type=Path, help="the run directory ([output].run_dir)")
    p.add_argument("--watch", type=float, metavar="SECONDS", default=None,
                   help="print the table again every SECONDS until no rank is running")
    p.add_argument("--json", action="store_true", help="every rank's record as JSON")

    p = add("evaluate", cmd_evaluate, "loss and accuracy of a saved model on a dataset")
    p.add_argument("model", type=Path, help="model file written by train (RUN_DIR/model.h5) or a "
                                            "checkpoint (RUN_DIR/ckpt/step_XXXXXXXX.h5)")
    p.add_argument("dataset", type=Path, help="dataset file (HDF5 with /X and /y)")

    p = add("predict", cmd_predict, "write a saved model's predictions for a dataset to HDF5",
            "Predict every row of DATASET with a model file or checkpoint and write OUTPUT.h5: "
            "/outputs (logits or regression values) and, for classification, /labels and "
            "/probabilities. Under mpirun every rank predicts and writes its share of the rows.")
    p.add_argument("model", type=Path, help="model file (RUN_DIR/model.h5) or checkpoint")
    p.add_argument("dataset", type=Path, help="dataset file (HDF5 with /X; /y is not needed)")
    p.add_argument("output", type=Path, help="predictions file to write (.h5)")

    p = add("make-dataset", cmd_make_dataset, "write a seeded synthetic dataset",
            "Write a seeded synthetic classification (Gaussian mixture) or regression (linear "
            "teacher) dataset. Under mpirun every rank writes its own slab of one file; the "
            "file's bytes do not depend on the number of ranks.")
    p.add_argument("output", type=Path, help="dataset file to write (.h5)")
    p.add_argument("--rows", type=int, default=10000, help="rows (1K to 10M and more; default 10000)")
    p.add_argument("--features", type=int, default=32, help="feature columns (default 32)")
    p.add_argument("--task", choices=("classification", "regression"), default="classification")
    p.add_argument("--classes", type=int, default=10, help="classes for classification (default 10)")
    p.add_argument("--targets", type=int, default=1, help="target columns for regression (default 1)")
    p.add_argument("--clusters", type=int, default=2, help="Gaussian blobs per class (default 2)")
    p.add_argument("--separation", type=float, default=1.0,
                   help="spread of the blob centres in units of the noise (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--test-rows", type=int, default=0,
                   help="also write OUTPUT-test.h5 with this many rows from the same problem")

    p = add("import-dataset", cmd_import_dataset, "convert .npz, .npy or .csv to a dataset",
            "Convert features and targets to a granger-mpi dataset. SOURCE is a .npz (arrays "
            "--x-key and --y-key), a .npy of features with --labels LABELS.npy, or a .csv "
            "(a header row is detected; the label is column --label-column). Rows with "
            "NaN/Inf or invalid labels are rejected with their row number.")
    p.add_argument("source", type=Path, help=".npz, .npy or .csv file")
    p.add_argument("output", type=Path, help="dataset file to write (.h5)")
    p.add_argument("--labels", type=Path, help="targets .npy, with a features .npy SOURCE")
    p.add_argument("--label-column", type=int, default=-1, help="CSV column of the target (default -1, the last)")
    p.add_argument("--task", choices=("auto", "classification", "regression"), default="auto",
                   help="auto: classification when every target is a non-negative integer")
    p.add_argument("--x-key", default="X", help="features array in a .npz (default X)")
    p.add_argument("--y-key", default="y", help="targets array in a .npz (default y)")

    data = sub.add_parser("dataset", help="checksums of a dataset file: add them, verify them",
                          description="Per-block CRC32 checksums of a dataset's rows (over the "
                                      "values, so any chunking or compression gives the same). "
                                      "make-dataset and import-dataset write them; training checks "
                                      "every block it reads. Both commands run in parallel under mpirun.",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_sub = data.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("checksum", help="add (or replace) the checksums of FILE",
                            description="Add /integrity (one CRC32 per block of rows of /X and /y) "
                                        "to a dataset file made elsewhere; replaces existing ones.")
    p.set_defaults(func=cmd_dataset_checksum)
    p.add_argument("file", type=Path, help="dataset file (.h5), written in place")
    p = data_sub.add_parser("verify", help="check FILE against its checksums (exit 1 if damaged)",
                            description="Read every block of /X and /y and compare it with its "
                                        "checksum; one line names each damaged block's rows. Exit 0 "
                                        "if all are intact, 1 if any is damaged, 2 if FILE has none.")
    p.set_defaults(func=cmd_dataset_verify)
    p.add_argument("file", type=Path, help="dataset file (.h5)")

    p = add("plot", cmd_plot, "PNG charts of a run: loss, accuracy, throughput, recoveries, time per rank (no MPI needed)",
            "Read RUN_DIR/metrics.h5 and write PNGs: loss and accuracy against step and against "
            "training time (the sum of step times), throughput (samples/s) and step time, and, "
            "when ranks failed, each recovery's detection/recovery/first-step seconds, and each "
            "rank's time split (data, compute, communication, wait, checkpoint). Recovery "
            "events are drawn as red dashed lines. OUT/index.txt says what each chart shows and "
            "what the run did not record. Works on a running job too (the steps flushed so far).")
    p.add_argument("run_dir", type=Path, help="the run directory ([output].run_dir)")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write (default RUN_DIR/plots)")

    p = add("report", cmd_report, "one self-contained HTML page about a run (no MPI needed)",
            "Write one HTML file with the run's summary (steps, final loss and accuracy, "
            "throughput, the COMPLETE record), its rank-failure recoveries, every rank's last "
            "status, the charts of `plot` (embedded as data: URIs) and the job file as run. "
            "The page loads nothing else: it can be mailed or opened anywhere.")
    p.add_argument("run_dir", type=Path, help="the run directory ([output].run_dir)")
    p.add_argument("--out", type=Path, metavar="FILE", help="where to write (default RUN_DIR/report.html)")

    p = add("compare", cmd_compare, "runs side by side: what differs in their jobs, what each reached (no MPI needed)",
            "Print a table with a row per run: the job keys whose values differ between the runs, "
            "then steps, the final training loss and accuracy (mean of the last 2%% of steps), "
            "the last validation, the test score, samples/s, ranks lost and whether it "
            "completed; and write OUT/loss.png and OUT/accuracy.png with every run's curve "
            "overlaid. For a sweep or a job array: granger-mpi compare runs/slurm/sweep_*.")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", type=Path, default=Path("compare"), metavar="DIR",
                   help="where to write the charts (default ./compare)")
    p.add_argument("--json", action="store_true", help="the table as JSON, no charts")

    p = add("dashboard", cmd_dashboard, "a live web page of a run, while it trains and after (no MPI needed)",
            "Serve a page that refreshes itself every 2 s: loss and accuracy (training, and "
            "validation when the job validates), throughput, each rank's state and step from "
            "RUN_DIR/status, and the rank-failure recoveries as they happen; the same data as "
            "JSON at /api/state. Read-only; it only reads the run directory, so it can run "
            "anywhere that sees it (a login node), before, during and after the run. On a "
            "cluster, reach it with ssh -L PORT:localhost:PORT.")
    p.add_argument("run_dir", type=Path, help="the run directory ([output].run_dir)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: any free one, printed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every "
                        "interface, anyone who can reach it sees the run)")

    p = add("model", cmd_model, "fit the alpha-beta-gamma cost model, project step time to 65,536 ranks (no MPI needed)",
            "Fit alpha (s per message), beta (s per byte sent) and gamma (s per byte added) to "
            "every BENCH/allreduce_*.csv (ring, rhd, rd medians) and print each fit's error on its "
            "points; take the kernel's FLOP rate from BENCH/kernels.csv; then predict step time, "
            "the algorithm auto would take, samples/s and efficiency of an MLP of --sizes at each "
            "of --ranks on this machine and on the network presets (ib100: 100 Gb/s "
            "InfiniBand-class, 10gbe). With --steps, instead: the step model (kernel, fixed cost, "
            "buckets, overlap) against measured training steps. docs/scaling.md explains both "
            "and their errors.")
    p.add_argument("--bench", type=Path, default=Path("docs/bench"), help="benchmark folder (default docs/bench)")
    p.add_argument("--sizes", default="784,256,10", help="MLP layer widths (default 784,256,10)")
    p.add_argument("--batch", type=int, default=256, help="global batch, fixed at every P (default 256)")
    p.add_argument("--per-rank-batch", type=int, default=128,
                   help="rows per rank for the weak-scaling columns (the global batch grows with P; "
                        "default 128)")
    p.add_argument("--ranks", default=",".join(map(str, (2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384, 65536))),
                   help="world sizes to predict (default 2 ... 65536)")
    p.add_argument("--read-us-per-row", type=float, default=0.0, metavar="US",
                   help="data-loading cost per row a rank reads in a step (default 0: compute and "
                        "communication only; about 40 measured here for random rows read from "
                        "HDF5, see docs/scaling.md)")
    p.add_argument("--network", default="local,ib100,10gbe",
                   help="comma-separated: local (this machine's fit), ib100, 10gbe (default all)")
    p.add_argument("--steps", "--measured", type=Path, nargs="+", metavar="CSV",
                   help="instead of the projections: the step model (buckets, overlap, threads) "
                        "against granger-mpi's measured steps in these scripts/bench-ddp CSVs (its "
                        "fixed cost fitted to their one-node runs); give --sizes and --batch of "
                        "those runs. --measured is the old name")
    p.add_argument("--kernels", type=Path, metavar="CSV",
                   help="with --steps: scripts/bench-kernels CSV at the runs' sizes, batches and "
                        "threads (default BENCH/stepmodel_kernels.csv)")

    p = add("supervise", cmd_supervise, "run a training job and restart it from checkpoints until done",
            "Start `mpirun -n N granger-mpi train JOB`; when the run fails (a lost rank or node), "
            "start it again with --resume auto, up to --max-restarts times with doubling backoff. "
            "Success is the run's own completion record (RUN_DIR/COMPLETE), not mpirun's exit code. "
            "Run it outside mpirun.")
    p.add_argument("job", type=Path, help="job file (TOML)")
    p.add_argument("-n", "--ranks", type=int, required=True, help="number of ranks")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first restart")
    p.add_argument("--max-backoff", type=float, default=300.0,
                   help="the longest wait between restarts, however many (default 300 s)")
    p.add_argument("--mpirun", default="mpirun", help="launcher (default: mpirun on PATH)")
    p.add_argument("--mpirun-arg", action="append", default=[], help="extra launcher argument (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="first attempt replaces an earlier run")
    _add_injections_for_restarts(p)

    p = add("run", cmd_run, "launch a training job with mpirun and the right fault-tolerance flags",
            "Build and run `mpirun ... granger-mpi train JOB`: with [fault].mode auto or ulfm it "
            "adds the flags ULFM needs (--with-ft ulfm --mca pml ob1 --mca btl tcp,self) and, "
            "with --detector-timeout, Open MPI's heartbeat failure detector; as root it adds "
            "--allow-run-as-root, and --oversubscribe when there are more ranks than cores and "
            "no hostfile. With --max-restarts it runs under `supervise`: a failed run starts "
            "again from its newest good checkpoint. Run it outside mpirun (inside an sbatch "
            "script too: mpirun picks up the allocation).")
    p.add_argument("job", type=Path, help="job file (TOML)")
    p.add_argument("-n", "--ranks", type=int, required=True, help="number of training ranks")
    p.add_argument("--spares", type=int, metavar="S", default=None,
                   help="launch S more ranks that wait idle and take the place of a training "
                        "rank that dies, so the run goes on at full size with the result of an "
                        "undisturbed run (ULFM; default [fault].spares)")
    p.add_argument("--hostfile", type=Path, help="Open MPI hostfile (default: this machine, "
                                                 "or the Slurm allocation)")
    p.add_argument("--detector-timeout", type=float, metavar="SECONDS", default=None,
                   help="declare a silent peer dead after SECONDS (heartbeat detector; for "
                        "lost nodes; a killed process is seen at once without it)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart from the newest checkpoint after a failure, up to this many "
                        "times (default 0: run once, exit with mpirun's code)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first restart")
    p.add_argument("--max-backoff", type=float, default=300.0,
                   help="the longest wait between restarts, however many (default 300 s)")
    p.add_argument("--mpirun", default="mpirun", help="launcher (default: mpirun on PATH)")
    p.add_argument("--mpirun-arg", action="append", default=[], help="extra launcher argument (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in run_dir")
    p.add_argument("--resume", metavar="auto|PATH", help="as for train")
    _add_injections_for_restarts(p)
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")

    p = add("inspect", cmd_inspect, "describe, verify or compare checkpoints (no MPI needed)",
            "Show a checkpoint's step, epoch, world size, config and tensors (shape, dtype, norm, "
            "CRC32). --verify recomputes every checksum (exit 1 naming the bad dataset); --diff "
            "compares two files tensor by tensor; --migrate brings files of format version 1 "
            "(granger-mpi 0.1, before manifests) to the current version, in place. PATH may be a "
            "run directory (its newest checkpoint).")
    p.add_argument("path", type=Path, help="checkpoint (.h5), model file or run directory")
    p.add_argument("other", type=Path, nargs="?", help="second file, with --diff")
    p.add_argument("--verify", action="store_true", help="recompute every checksum")
    p.add_argument("--diff", action="store_true", help="compare PATH with OTHER")
    p.add_argument("--migrate", action="store_true",
                   help="add a manifest to older files (PATH and OTHER), after checking them")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    bench = sub.add_parser("bench", help="benchmarks (run under mpirun)",
                           description="Benchmarks; run them under mpirun with the ranks to measure.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p = bench_sub.add_parser(
        "allreduce", help="every allreduce algorithm side by side, OSU style",
        description="Time every allreduce algorithm (and PyTorch gloo with --torch) side by side "
                    "for message sizes from --min-bytes to --max-bytes; write CSV and PNG.")
    p.set_defaults(func=cmd_bench_allreduce)
    p.add_argument("--algorithms", default="native,ring,rhd,rd,shm,hierarchical,auto",
                   help="comma-separated (default: all)")
    p.add_argument("--min-bytes", type=int, default=4)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per size (default 3)")
    p.add_argument("--torch", action="store_true", help="also time torch.distributed on gloo")
    p.add_argument("--torch-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up gloo's rendezvous (at rank 0's address; MASTER_ADDR overrides) "
                        "after this long (default 60)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="emulate nodes of this many ranks for 'hierarchical'")
    p.add_argument("--out", default="docs/bench", help="folder for CSV and PNG (default docs/bench)")
    p.add_argument("--tag", default="", help="suffix for the CSV/PNG names, e.g. _net1g")
    p.add_argument("--link-rate", type=float, default=None, metavar="BITS_PER_S",
                   help="link rate of a network-bound run (e.g. 1e9): adds the bandwidth bound "
                        "2(P-1)/P n / rate to the table")

    p = bench_sub.add_parser(
        "calibrate", help="measure the algorithms for 'auto' at this number of ranks",
        description="Time every algorithm at sizes 4 B to --max-bytes at this number of ranks and "
                    "store the table (and fitted alpha, beta, gamma) that algorithm 'auto' uses, in "
                    "GRANGER_CALIBRATION or ~/.cache/granger-mpi/calibration.json.")
    p.set_defaults(func=cmd_bench_calibrate)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="calibration file to update (default as above)")

    p = bench_sub.add_parser(
        "checkpoint", help="checkpoint save bandwidth against dd conv=fsync",
        description="Save checkpoints of --sizes MiB of state (parameters + optimizer) into --dir "
                    "and, in the same run, write as many bytes with dd conv=fsync; print both.")
    p.set_defaults(func=cmd_bench_checkpoint)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 256, 1024],
                   help="state sizes in MiB, comma-separated (default 1,16,256,1024)")
    p.add_argument("--reps", type=int, default=15,
                   help="saves (and dd runs) per size (default 15: on a VM, a quarter of the reps "
                        "of a large size may stall, the save's or dd's, and must not make the "
                        "median); sizes under 64 MiB get at least 31, as they take milliseconds")
    p.add_argument("--dir", default="runs/bench-checkpoint", help="where to write (same disk as dd)")
    p.add_argument("--no-verify", action="store_true", help="skip the read-back verification")
    p.add_argument("--out", default="docs/bench", help="folder for the CSV")

    p = add("doctor", cmd_doctor, "check the installation: MPI, parallel HDF5, numba, ULFM",
            "Print the MPI library and HDF5 actually loaded, numba's threading layer and "
            "whether ULFM fault tolerance works (a real probe); exit 1 if something is missing.")
    p.add_argument("--require-ulfm", action="store_true", help="fail when ULFM is not available")
    return parser


def _rank_and_size():
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
    return 0, 1


def main(argv=None):
    """Entry point of the ``granger-mpi`` console script."""
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
    handler = logging.StreamHandler(sys.stdout)   # in order with the progress lines
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("granger_mpi").addHandler(handler)
    logging.getLogger("granger_mpi").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "supervise"):
        # Launchers must not pass this process's thread counts on to the ranks they start:
        # a launcher is one process per node, so it would give every rank all the cores.
        _default_threads(_requested_threads(args))
    from granger_mpi.errors import EXIT_FAILURE, UserError
    try:
        return args.func(args)
    except UserError as exc:
        rank, size = _rank_and_size()
        if exc.agreed or size == 1:
            if rank == 0:
                print(f"granger-mpi: error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        # Only this rank saw it: the others may wait for it in a collective, so end the job.
        print(f"granger-mpi: error on rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`granger-mpi inspect ... | head`): nothing more to say, and
        # Python's flush of stdout at exit must not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception:
        rank, size = _rank_and_size()
        print(f"granger-mpi: internal error on rank {rank}:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        if size > 1:
            sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(EXIT_FAILURE)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
