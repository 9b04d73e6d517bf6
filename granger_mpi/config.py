"""Job files: TOML parsed into frozen dataclasses, every key checked.

Relative paths in a job file are taken relative to the job file's own directory, so a job
runs the same from any working directory (a Slurm job's, a test's).

Every problem raises ``UserError`` with one line that names the key (``[train].epochs``)
or the file; nothing is created before the whole job file has been checked.
"""

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from granger_mpi import collectives, factories
from granger_mpi import secrets
from granger_mpi.errors import UserError


def _spec(default=dataclasses.MISSING, *, kind, min=None, max=None, choices=None,
          exclusive_min=False, exclusive_max=False):
    """A dataclass field with its TOML type and allowed range."""
    meta = {"kind": kind, "min": min, "max": max, "choices": choices,
            "exclusive_min": exclusive_min, "exclusive_max": exclusive_max}
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """``[data]``: where the rows come from and how they are streamed."""

    path: Path = _spec(kind="path")
    test_path: Path | None = _spec(None, kind="path")
    validation_path: Path | None = _spec(None, kind="path")
    prefetch_steps: int = _spec(2, kind=int, min=1, max=64)
    memory_budget_mb: float = _spec(512.0, kind=float, min=0, exclusive_min=True)
    allow_external_storage: bool = _spec(False, kind=bool)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """``[model]``: the network. ``kind`` is a built-in one or ``"package.module:factory"``,
    a model of your own (``granger_mpi.model.custom``) built with the table ``options``."""

    kind: str = _spec(kind=str)
    hidden: tuple = _spec((), kind="int_list", min=1)
    activation: str = _spec("relu", kind=str, choices=("relu", "tanh", "gelu"))
    options: dict | None = _spec(None, kind="table")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """``[optimizer]``: how gradients become updates (PyTorch's definitions throughout).

    ``name``: ``sgd`` (with ``momentum``, optionally ``nesterov``), ``adam`` (``weight_decay``
    as L2 in the gradient) or ``adamw`` (decoupled decay). ``schedule``: ``constant``,
    ``step`` (times ``gamma`` every ``step_size`` steps) or ``cosine`` (to
    ``min_learning_rate`` at the last step), after ``warmup_steps`` of linear warm-up.
    ``scale_with_batch`` multiplies the rate by ``global_batch / base_batch``. Clipping,
    after the gradients are summed: ``clip_value`` per element, then ``clip_norm`` on the
    global norm.
    """

    name: str = _spec("sgd", kind=str, choices=("sgd", "adam", "adamw"))
    learning_rate: float = _spec(kind=float, min=0, exclusive_min=True)
    momentum: float = _spec(0.0, kind=float, min=0, max=1)
    nesterov: bool = _spec(False, kind=bool)
    weight_decay: float = _spec(0.0, kind=float, min=0)
    beta1: float = _spec(0.9, kind=float, min=0, max=1, exclusive_max=True)
    beta2: float = _spec(0.999, kind=float, min=0, max=1, exclusive_max=True)
    eps: float = _spec(1e-8, kind=float, min=0, exclusive_min=True)
    schedule: str = _spec("constant", kind=str, choices=("constant", "step", "cosine"))
    warmup_steps: int = _spec(0, kind=int, min=0)
    step_size: int | None = _spec(None, kind=int, min=1)
    gamma: float = _spec(0.1, kind=float, min=0, max=1, exclusive_min=True)
    min_learning_rate: float = _spec(0.0, kind=float, min=0)
    scale_with_batch: bool = _spec(False, kind=bool)
    base_batch: int = _spec(256, kind=int, min=1)
    clip_norm: float | None = _spec(None, kind=float, min=0, exclusive_min=True)
    clip_value: float | None = _spec(None, kind=float, min=0, exclusive_min=True)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``[train]``: batch, length and seed; how a rank computes.

    ``accumulation_steps`` splits each rank's rows of a step into that many micro-batches
    whose gradients are summed before the one exchange (less memory, same global batch).
    ``threads_per_rank`` (default: the node's cores shared by its ranks, at least 1) sets
    BLAS and numba threads. ``shard_optimizer`` keeps each rank's share of the optimizer
    state only (ZeRO stage 1: reduce-scatter, update the shard, allgather the parameters).
    ``strategy = "async"``: a parameter server (rank 0) and asynchronous workers, each
    gradient weighted by ``staleness_weight`` (``inverse``: 1/(1+staleness), or
    ``constant``) and dropped beyond ``max_staleness`` (see ``granger_mpi.async_sgd``).
    ``validate_every_steps``: the loss and accuracy on ``[data].validation_path`` every that
    many steps and after the last (each rank its share of the rows, one reduction).
    """

    global_batch: int = _spec(kind=int, min=1)
    epochs: int = _spec(1, kind=int, min=1)
    max_steps: int | None = _spec(None, kind=int, min=1)
    seed: int = _spec(0, kind=int, min=0, max=2**63 - 1)
    accumulation_steps: int = _spec(1, kind=int, min=1)
    threads_per_rank: int | None = _spec(None, kind=int, min=1, max=1024)
    shard_optimizer: bool = _spec(False, kind=bool)
    strategy: str = _spec("sync", kind=str, choices=("sync", "async"))
    staleness_weight: str = _spec("inverse", kind=str, choices=("inverse", "constant"))
    max_staleness: int = _spec(8, kind=int, min=0)
    validate_every_steps: int | None = _spec(None, kind=int, min=1)


@dataclass(frozen=True, kw_only=True)
class CollectivesConfig:
    """``[collectives]``: how gradients are summed across ranks.

    ``auto`` picks per message size from the calibration (see ``collectives.auto``); name an
    algorithm to get bit-identical results across machines whose calibrations differ.
    ``ranks_per_node`` emulates nodes of that many ranks for ``hierarchical``.
    ``bucket_mb``: the gradient is summed in buckets of at most this many MiB, cut where
    backward finishes a layer (0: one message after the whole backward; ``"auto"``: 1 MiB
    when the ranks span nodes, where a link carries 1 MiB messages near its rate and longer
    ones not, and one message on one node, where shared memory gains nothing); with ``overlap``,
    each bucket as soon as backward has finished it, on a thread, while backward goes on
    (``"auto"``: where the rank's share of the CPUs leaves a core for that thread; without
    one the thread only competes with backward, and the buckets go after it).
    ``compression = "bf16"`` sends the gradient as bfloat16 around the ring (half the bytes,
    sums in float32, the same bits on every rank; the statistics stay float32): results
    differ from float32 sums in the third significant digit.
    """

    algorithm: str = _spec("auto", kind=str)
    ranks_per_node: int | None = _spec(None, kind=int, min=1)
    bucket_mb: float | str = _spec("auto", kind="float_or_auto", min=0)
    overlap: bool | str = _spec("auto", kind="bool_or_auto")
    compression: str = _spec("none", kind=str, choices=("none", "bf16"))


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """``[output]``: where results go and how often progress is printed.

    ``timing_every_steps``: how often each rank's time split (data, compute, communication,
    checkpoint, other, wait) is gathered into ``metrics.h5``. Besides ``metrics.h5``: ``jsonl``
    writes ``RUN_DIR/metrics.jsonl``, ``http_url`` POSTs the same lines there, and
    ``reporters`` names your own sinks as ``"package.module:factory"`` (see
    ``granger_mpi.reporters``). ``trace_steps``: a timeline of that many steps from step
    ``trace_first_step`` on (counted from 1, as the progress line does): each rank's
    forward, backward per layer, buckets exchanged and waits, written to
    ``RUN_DIR/trace.json`` for ``chrome://tracing`` or ui.perfetto.dev.
    """

    run_dir: Path = _spec(kind="path")
    progress_interval_s: float = _spec(5.0, kind=float, min=0)
    metrics_flush_steps: int = _spec(100, kind=int, min=1)
    timing_every_steps: int = _spec(100, kind=int, min=1)
    jsonl: bool = _spec(False, kind=bool)
    http_url: str | None = _spec(None, kind=str)
    reporters: tuple = _spec((), kind="str_list")
    trace_steps: int = _spec(0, kind=int, min=0, max=100000)
    trace_first_step: int = _spec(10, kind=int, min=1)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """``[checkpoint]``: when to save ``RUN_DIR/ckpt/step_XXXXXXXX.h5``.

    Also on SIGUSR1 (save, go on), SIGTERM or a file ``RUN_DIR/STOP`` (save, stop with exit
    code 3), always at the next step boundary, agreed by all ranks.
    """

    every_steps: int | None = _spec(None, kind=int, min=1)
    every_seconds: float | None = _spec(None, kind=float, min=0, exclusive_min=True)
    keep_last: int = _spec(3, kind=int, min=1)
    at_end: bool = _spec(True, kind=bool)
    verify_after_write: bool = _spec(True, kind=bool)
    # Periodic and SIGUSR1 saves written in the background from a copy of the state (rank 0,
    # serial HDF5) while training goes on; not with a sharded optimizer or under ULFM.
    async_write: bool = _spec(False, kind=bool)
    # States smaller than this (and not sharded) are written by rank 0 alone with serial
    # HDF5, larger ones by every rank into its part of the file; 0: always every rank.
    parallel_write_from_mib: float = _spec(64.0, kind=float, min=0)


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """``[fault]``: what to do when ranks die or hang.

    ``mode``: ``auto`` uses ULFM (revoke, shrink, carry on) when a probe at start-up finds
    it working in this job, else leaves failures to ``granger-mpi supervise`` (restart from
    the newest checkpoint); ``ulfm`` or ``restart`` force one. Below ``min_ranks`` survivors,
    or past ``max_failures`` lost ranks in all or ``max_failures_per_node`` on one host, the
    run stops with exit code 5: ``on_limit = "stop"`` saves a checkpoint first, ``"abort"``
    leaves at once (the newest periodic checkpoint stays). The watchdog aborts the job (exit
    code 6) when a step lasts longer than ``step_timeout_s`` (0: automatic, 50x the median
    step and at least 60 s) or a checkpoint or recovery longer than ``checkpoint_timeout_s``,
    or the start-up (checks, kernels, resume, sinks, the first rows) than ``startup_timeout_s``,
    or the end (the test-set evaluation, ``model.h5``, the completion record) than
    ``finish_timeout_s``.
    Every rank writes ``RUN_DIR/status/rank-N.json`` every ``status_interval_s``.
    ``spares``: of the ranks launched, the last ``spares`` wait idle and take a dead
    rank's place (ULFM only; ``granger-mpi run --spares`` launches them).
    """

    mode: str = _spec("auto", kind=str, choices=("auto", "ulfm", "restart"))
    min_ranks: int = _spec(1, kind=int, min=1)
    max_failures: int = _spec(3, kind=int, min=0)
    max_failures_per_node: int = _spec(3, kind=int, min=0)
    on_limit: str = _spec("stop", kind=str, choices=("stop", "abort"))
    step_timeout_s: float = _spec(0.0, kind=float, min=0)
    checkpoint_timeout_s: float = _spec(600.0, kind=float, min=0, exclusive_min=True)
    startup_timeout_s: float = _spec(600.0, kind=float, min=0, exclusive_min=True)
    finish_timeout_s: float = _spec(1800.0, kind=float, min=0, exclusive_min=True)
    status_interval_s: float = _spec(1.0, kind=float, min=0.05)
    spares: int = _spec(0, kind=int, min=0)


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A whole job file."""

    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    output: OutputConfig
    collectives: CollectivesConfig = CollectivesConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    fault: FaultConfig = FaultConfig()
    source: Path | None = None
    text: str = ""  # the job file as written, kept with the outputs

    def to_json(self):
        """The parsed job as JSON (paths as strings), for HDF5 attributes."""
        def plain(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return list(value)
            return value
        sections = {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                    for f in dataclasses.fields(self) if f.name not in ("source", "text")}
        if sections["output"]["http_url"] is not None:     # stored everywhere: no credentials
            sections["output"]["http_url"] = secrets.redact_url(sections["output"]["http_url"])
        return json.dumps(sections, sort_keys=True)


BUILT_IN_MODELS = ("softmax", "logistic", "linear", "mlp")
SECTIONS = {f.name: f.type for f in dataclasses.fields(JobConfig) if f.name not in ("source", "text")}
REQUIRED_SECTIONS = ("data", "model", "optimizer", "train", "output")


def _convert(value, meta, where, base_dir):
    kind = meta["kind"]
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise UserError(f"{where} must be a non-empty path string, got {value!r}")
        path = Path(value).expanduser()
        return (base_dir / path).resolve()
    if kind == "int_list":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in value):
            raise UserError(f"{where} must be a list of integers, got {value!r}")
        for v in value:
            _check_range(v, meta, where)
        return tuple(value)
    if kind == "table":
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table ({{key = value, ...}}), got {value!r}")
        try:
            json.dumps(value)
        except TypeError as exc:
            raise UserError(f"{where}: {exc} (files record the options as JSON)") from None
        return value
    if kind == "str_list":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise UserError(f"{where} must be a list of non-empty strings, got {value!r}")
        return tuple(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "float_or_auto":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where} must be a number or \"auto\", got {value!r}")
        _check_range(float(value), meta, where)
        return float(value)
    if kind == "bool_or_auto":
        if not isinstance(value, bool) and value != "auto":
            raise UserError(f"{where} must be true, false or \"auto\", got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{where} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(f"{where} must be one of {', '.join(map(repr, meta['choices']))}; got {value!r}")
    _check_range(value, meta, where)
    return value


def _check_range(value, meta, where):
    low, high = meta["min"], meta["max"]
    if low is not None and (value <= low if meta["exclusive_min"] else value < low):
        bound = f"> {low}" if meta["exclusive_min"] else f">= {low}"
        raise UserError(f"{where} must be {bound}, got {value!r}")
    if high is not None and (value >= high if meta.get("exclusive_max") else value > high):
        raise UserError(f"{where} must be {'<' if meta.get('exclusive_max') else '<='} {high}, got {value!r}")


def _section(cls, table, name, base_dir):
    if not isinstance(table, dict):
        raise UserError(f"[{name}] must be a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise UserError(f"unknown key [{name}].{unknown[0]} (known keys: {', '.join(fields)})")
    values = {}
    for key, f in fields.items():
        where = f"[{name}].{key}"
        if key in table:
            values[key] = _convert(table[key], f.metadata, where, base_dir)
        elif f.default is dataclasses.MISSING:
            raise UserError(f"missing key {where}")
    return cls(**values)


def parse(text, source=None):
    """A ``JobConfig`` from TOML text; ``source`` is the file it came from, if any."""
    where = source if source is not None else "job file"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown section [{unknown[0]}] (known sections: {', '.join(SECTIONS)})")
    for name in REQUIRED_SECTIONS:
        if name not in doc:
            raise UserError(f"missing section [{name}]")
    base_dir = Path(source).resolve().parent if source is not None else Path.cwd()
    sections = {name: _section(cls, doc[name], name, base_dir)
                for name, cls in SECTIONS.items() if name in doc}
    job = JobConfig(**sections, source=Path(source) if source is not None else None,
                    text=secrets.redact_text(text))
    _check_job(job)
    return job


def _check_job(job):
    """Checks that span keys or touch the file system."""
    custom = ":" in job.model.kind
    if not custom and job.model.kind not in BUILT_IN_MODELS:
        raise UserError(f"[model].kind must be one of {', '.join(map(repr, BUILT_IN_MODELS))} or "
                        f"'package.module:factory' (a model of your own); got {job.model.kind!r}")
    if custom and not factories.is_spec(job.model.kind):
        raise UserError(f"[model].kind = {job.model.kind!r} must be 'package.module:factory'")
    if job.model.options is not None and not custom:
        raise UserError(f"[model].options are for a model of your own ('package.module:factory'), "
                        f"not kind = {job.model.kind!r}")
    if job.model.kind == "mlp" and not job.model.hidden:
        raise UserError("[model].hidden must list at least one layer width for kind = 'mlp'")
    if job.model.kind != "mlp" and job.model.hidden:
        raise UserError(f"[model].hidden is only for kind = 'mlp', not {job.model.kind!r}")
    out = job.output
    if out.http_url is not None and not (out.http_url.startswith(("http://", "https://"))
                                         or secrets.is_reference(out.http_url)):
        raise UserError(f"[output].http_url must start with http:// or https://, or be "
                        f"env:VARIABLE, got {secrets.redact_url(out.http_url)!r}")
    for spec in out.reporters:
        if not factories.is_spec(spec):
            raise UserError(f"[output].reporters entry {spec!r} must be 'package.module:factory'")
    opt = job.optimizer
    if opt.name != "sgd" and opt.momentum != 0:
        raise UserError(f"[optimizer].momentum is for name = 'sgd'; {opt.name!r} uses beta1")
    if opt.nesterov and (opt.name != "sgd" or opt.momentum == 0):
        raise UserError("[optimizer].nesterov needs name = 'sgd' and momentum > 0")
    if opt.schedule == "step" and opt.step_size is None:
        raise UserError("[optimizer].step_size is needed for schedule = 'step'")
    if opt.schedule != "step" and opt.step_size is not None:
        raise UserError(f"[optimizer].step_size is only for schedule = 'step', not {opt.schedule!r}")
    if job.train.shard_optimizer and job.fault.mode == "ulfm":
        raise UserError("[train].shard_optimizer needs [fault].mode = 'restart' or 'auto': a lost "
                        "rank's optimizer shard cannot be recovered in place")
    if job.train.strategy == "async" and job.train.shard_optimizer:
        raise UserError("[train].shard_optimizer is for strategy = 'sync' (the async server holds "
                        "all optimizer state)")
    if job.train.strategy == "async" and job.fault.mode == "ulfm":
        raise UserError("[train].strategy = 'async' does not recover from rank failures; "
                        "[fault].mode must be 'auto' or 'restart'")
    if opt.min_learning_rate > opt.learning_rate:
        raise UserError(f"[optimizer].min_learning_rate = {opt.min_learning_rate} is above "
                        f"learning_rate = {opt.learning_rate}")
    if (job.train.validate_every_steps is None) != (job.data.validation_path is None):
        given = "validate_every_steps" if job.data.validation_path is None else "validation_path"
        raise UserError(f"[train].validate_every_steps and [data].validation_path go together; "
                        f"only {given} is set")
    if job.train.validate_every_steps is not None and job.train.strategy == "async":
        raise UserError("[train].validate_every_steps is for strategy = 'sync'")
    for key, path in (("[data].path", job.data.path), ("[data].test_path", job.data.test_path),
                      ("[data].validation_path", job.data.validation_path)):
        if path is not None and not path.is_file():
            raise UserError(f"{key}: dataset file {path} not found")
    if job.collectives.algorithm not in collectives.ALGORITHMS:
        raise UserError(f"[collectives].algorithm must be one of "
                        f"{', '.join(map(repr, collectives.ALGORITHMS))}; got {job.collectives.algorithm!r}")
    if job.collectives.compression != "none":
        if job.collectives.algorithm not in ("auto", "ring"):
            raise UserError(f"[collectives].compression = {job.collectives.compression!r} runs on the "
                            f"ring: algorithm must be 'auto' or 'ring', not {job.collectives.algorithm!r}")
        if job.train.shard_optimizer or job.train.strategy == "async":
            raise UserError(f"[collectives].compression = {job.collectives.compression!r} is for "
                            f"strategy = 'sync' without shard_optimizer (it compresses the allreduce)")


def _utf8_path(path, what):
    """``path`` unless its name is not UTF-8 (it then reaches Python with surrogates, which
    neither HDF5 attributes nor messages between ranks can carry)."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        shown = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
        raise UserError(f"{what} {shown}: the path is not valid UTF-8; rename it or choose "
                        f"another") from None
    return path


def load(path, run_dir=None):
    """Read and check a job file; ``run_dir`` (if given) replaces ``[output].run_dir``.

    A relative ``run_dir`` is taken relative to the working directory (it comes from the
    command line, not from the job file).
    """
    path = Path(_utf8_path(path, "job file"))
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"job file {path} not found") from None
    except OSError as exc:
        raise UserError(f"job file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserError(f"job file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                        f"on line {line}); TOML files are UTF-8") from None
    job = parse(text, source=path)
    if run_dir is not None:
        if not str(run_dir):
            raise UserError("--run-dir must be a non-empty path")
        _utf8_path(run_dir, "--run-dir")
        output = dataclasses.replace(job.output, run_dir=Path(run_dir).expanduser().resolve())
        job = dataclasses.replace(job, output=output)
    return job


def with_spares(job: JobConfig, spares: int) -> JobConfig:
    """``job`` with ``[fault].spares`` set (``--spares``)."""
    if spares < 0:
        raise UserError(f"--spares {spares}: the number of spare ranks must be 0 or more")
    return dataclasses.replace(job, fault=dataclasses.replace(job.fault, spares=spares))
