"""Bad inputs under mpirun: one clear line, exit code 2, nothing written to the run dir."""

import json
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from conftest import GRANGER, _env, granger, mpirun, tmpfs, write_job
from granger_mpi.data import integrity
from granger_mpi.storage import manifest


def check_rejected(run, run_dir, message):
    assert run.returncode == 2, run.output
    lines = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(lines) == 1, run.output          # one line, from one rank
    assert message in lines[0], run.output
    assert "Traceback" not in run.stderr
    assert not run_dir.exists(), "a rejected job must not create its run directory"


def make(path, X, y):
    with h5py.File(path, "w") as f:
        if X is not None:
            f["X"] = X
        f["y"] = y
    return path


@pytest.fixture
def job(tmp_path, small_dataset):
    def write(dataset=small_dataset, **sections):
        return write_job(tmp_path / "job.toml", dataset=dataset, run_dir=tmp_path / "run", **sections)
    return write


def test_missing_dataset_file(tmp_path, job):
    run = mpirun(2, "train", job(dataset=tmp_path / "missing.h5"), timeout=60)
    check_rejected(run, tmp_path / "run", "[data].path: dataset file")


def test_dataset_without_X(tmp_path, job):
    data = make(tmp_path / "noX.h5", None, np.zeros(10, np.int32))
    check_rejected(mpirun(2, "train", job(dataset=data), timeout=60), tmp_path / "run", "has no /X dataset")


def test_mismatched_lengths(tmp_path, job):
    data = make(tmp_path / "short.h5", np.zeros((10, 3), np.float32), np.arange(9, dtype=np.int32) % 2)
    check_rejected(mpirun(2, "train", job(dataset=data), timeout=60), tmp_path / "run", "/X has 10 rows but /y has 9")


def test_unknown_config_key(tmp_path, job):
    run = mpirun(2, "train", job(optimizer={"learning_rate": 0.1, "lr_decay": 0.5}), timeout=60)
    check_rejected(run, tmp_path / "run", "unknown key [optimizer].lr_decay")


def test_negative_learning_rate(tmp_path, job):
    run = mpirun(2, "train", job(optimizer={"learning_rate": -0.1}), timeout=60)
    check_rejected(run, tmp_path / "run", "[optimizer].learning_rate must be > 0, got -0.1")


def test_global_batch_smaller_than_world(tmp_path, job):
    run = mpirun(3, "train", job(train={"global_batch": 2}), timeout=60)
    check_rejected(run, tmp_path / "run", "[train].global_batch = 2 is smaller than the 3 ranks")


def test_nan_in_data_is_reported_at_the_step_that_reads_it(tmp_path, job):
    """NaN is not searched for at load (that would read the whole file on start-up); the
    rank that reads the row stops every rank at that step, and nothing is saved."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)).astype(np.float32)
    X[137, 2] = np.nan
    data = make(tmp_path / "nan.h5", X, rng.integers(0, 2, 200).astype(np.int32))
    run = mpirun(3, "train", job(dataset=data, train={"global_batch": 32, "epochs": 1}), timeout=60)
    assert run.returncode == 2, run.output
    assert "row 137 has a NaN/Inf feature in /X" in run.stderr, run.output
    assert not (tmp_path / "run" / "model.h5").exists()


def test_label_out_of_range_is_reported(tmp_path, job):
    X = np.zeros((64, 3), np.float32)
    y = np.zeros(64, np.int32)
    y[5] = 7
    with h5py.File(tmp_path / "labels.h5", "w") as f:
        f["X"], f["y"] = X, y
        f.attrs["n_classes"] = 3
    run = mpirun(2, "train", job(dataset=tmp_path / "labels.h5", train={"global_batch": 16, "epochs": 1}),
                 timeout=60)
    assert run.returncode == 2 and "row 5" in run.stderr and "outside [0, 3)" in run.stderr, run.output


def test_existing_run_is_not_overwritten_without_flag(tmp_path, job):
    path = job(train={"max_steps": 2})
    assert mpirun(1, "train", path).returncode == 0
    before = (tmp_path / "run" / "model.h5").read_bytes()
    run = mpirun(2, "train", path, timeout=60)
    assert run.returncode == 2 and "already holds a run" in run.stderr, run.output
    assert (tmp_path / "run" / "model.h5").read_bytes() == before
    assert mpirun(2, "train", path, "--overwrite").returncode == 0


def test_missing_job_file(tmp_path):
    run = mpirun(2, "train", tmp_path / "nope.toml", timeout=60)
    assert run.returncode == 2 and "job file" in run.stderr and "not found" in run.stderr, run.output


def labelled(path, y, n_classes=None):
    """A 2-class-ish dataset of ``len(y)`` rows whose labels are stored as ``y`` (its dtype)."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f["X"] = rng.normal(size=(len(y), 3)).astype(np.float32)
        f["y"] = y
        if n_classes is not None:
            f.attrs["n_classes"] = n_classes
    return path


@pytest.mark.parametrize("declared", [3, None], ids=["n_classes-attribute", "n_classes-from-labels"])
def test_a_64_bit_label_that_would_wrap_to_a_valid_class_is_refused(tmp_path, job, declared):
    """2**32 + 1 cast to int32 is 1: the range is checked on the stored int64 value."""
    y = np.arange(64, dtype=np.int64) % 3
    y[5] = 2**32 + 1
    data = labelled(tmp_path / "wide.h5", y, declared)
    run = mpirun(2, "train", job(dataset=data, train={"global_batch": 16, "epochs": 1}), timeout=60)
    assert run.returncode == 2, run.output
    assert "row 5" in run.stderr, run.output
    assert not (tmp_path / "run" / "model.h5").exists()


def test_a_valid_int64_label_file_trains_and_evaluates(tmp_path, job):
    y = np.arange(64, dtype=np.int64) % 3
    data = labelled(tmp_path / "int64.h5", y)
    run = mpirun(2, "train", job(dataset=data, train={"global_batch": 16, "epochs": 1}), timeout=60)
    assert run.returncode == 0, run.output
    evaluated = mpirun(2, "evaluate", tmp_path / "run" / "model.h5", data, timeout=60)
    assert evaluated.returncode == 0 and "64 rows" in evaluated.stdout, evaluated.output
    y[40] = -(2**32) + 2          # int32 would read 2
    bad = mpirun(2, "evaluate", tmp_path / "run" / "model.h5",
                 labelled(tmp_path / "bad.h5", y, 3), timeout=60)
    assert bad.returncode == 2, bad.output
    assert "row 40 has a NaN/Inf feature in /X or a label outside [0, 3)" in bad.stderr, bad.output


def test_n_classes_is_capped(tmp_path, job):
    data = labelled(tmp_path / "many.h5", np.arange(64, dtype=np.int64) % 3, 1 << 40)
    run = mpirun(2, "train", job(dataset=data), timeout=60)
    check_rejected(run, tmp_path / "run", "its n_classes is 1099511627776")


def test_a_bad_test_set_leaves_no_completion_record(tmp_path, job, small_dataset):
    """COMPLETE comes last, with the test score: a NaN row in the test set ends the run with
    exit 2 and no completion record for the supervisor to trust, nor a model.h5 ("nothing
    written" is true of the run's results; the checkpoints stay)."""
    test_set = tmp_path / "test.h5"
    shutil.copy(small_dataset, test_set)
    with h5py.File(test_set, "a") as f:
        f["X"][7, 0] = np.nan
        integrity.add(f)          # a NaN the file was written with, not a damaged byte
    run = mpirun(2, "train", job(data={"test_path": str(test_set)}, train={"max_steps": 10}),
                 timeout=60)
    assert run.returncode == 2, run.output
    assert "row 7 has a NaN/Inf feature" in run.stderr, run.output
    assert not (tmp_path / "run" / "COMPLETE").exists()
    assert not (tmp_path / "run" / "model.h5").exists()


def test_the_completion_record_holds_the_test_score(tmp_path, job, small_dataset):
    test_set = small_dataset.with_name("small-test.h5")
    run = mpirun(2, "train", job(data={"test_path": str(test_set)}, train={"max_steps": 10}),
                 timeout=60)
    assert run.returncode == 0, run.output
    record = json.loads((tmp_path / "run" / "COMPLETE").read_text())
    assert 0 < record["test_loss"] < 10 and 0 <= record["test_accuracy"] <= 1, record


def test_overwrite_clears_checkpoints_through_a_symlinked_ckpt(tmp_path, job):
    """Checkpoints on scratch (``ckpt`` a symlink): ``--overwrite`` deletes the old run's
    checkpoints there and keeps the link, so ``--resume auto`` cannot pick one up."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt").symlink_to(scratch)
    first = job(train={"max_steps": 40}, checkpoint={"every_steps": 20})
    assert mpirun(2, "train", first, timeout=60).returncode == 0
    assert (scratch / "step_00000040.h5").exists()
    again = job(train={"max_steps": 10}, checkpoint={"every_steps": 20})
    run = mpirun(2, "train", again, "--overwrite", timeout=60)
    assert run.returncode == 0, run.output
    assert (tmp_path / "run" / "ckpt").is_symlink()
    assert sorted(p.name for p in scratch.iterdir()) == ["latest", "notes.txt", "step_00000010.h5"]


def external(path, tmp_path):
    """/X stored in a raw file beside the HDF5 file (HDF5 external storage)."""
    raw = tmp_path / "secret.bin"
    raw.write_bytes(np.arange(64 * 3, dtype=np.float32).tobytes())
    with h5py.File(path, "w") as f:
        f.create_dataset("X", (64, 3), np.float32, external=[(str(raw), 0, 64 * 3 * 4)])
        f["y"] = np.arange(64, dtype=np.int32) % 2
    return path


def virtual(path, tmp_path):
    """/X a virtual dataset mapping another file's dataset."""
    source = tmp_path / "elsewhere.h5"
    with h5py.File(source, "w") as f:
        f["data"] = np.ones((64, 3), np.float32)
    layout = h5py.VirtualLayout((64, 3), np.float32)
    layout[...] = h5py.VirtualSource(str(source), "data", (64, 3))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("X", layout)
        f["y"] = np.arange(64, dtype=np.int32) % 2
    return path


def unwritten(path, tmp_path):
    """A small file whose /X claims 2^40 rows it never stored (chunked, no chunk written)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("X", (1 << 40, 3), np.float32, chunks=(1024, 3))
        f.create_dataset("y", (1 << 40,), np.int32, chunks=(1024,))
        f.attrs["n_classes"] = 2
    return path


@pytest.mark.parametrize("make,message", [
    (external, "/X uses HDF5 external storage"),
    (virtual, "/X is a virtual dataset"),
    (unwritten, "/X claims 1,099,511,627,776 rows but stores"),
], ids=["external", "virtual", "unwritten"])
def test_a_dataset_whose_values_live_elsewhere_or_nowhere_is_refused(tmp_path, job, make, message):
    """Training would read any file the job can read as features (external, virtual), or
    allocate for rows that do not exist (#27 item 10)."""
    data = make(tmp_path / "d.h5", tmp_path)
    run = mpirun(2, "train", job(dataset=data, train={"global_batch": 16, "epochs": 1}), timeout=60)
    check_rejected(run, tmp_path / "run", message)


def test_external_storage_is_allowed_when_the_job_says_so(tmp_path, job):
    data = external(tmp_path / "d.h5", tmp_path)
    run = mpirun(2, "train", job(dataset=data, data={"allow_external_storage": True},
                                 train={"global_batch": 16, "epochs": 1}), timeout=60)
    assert run.returncode == 0, run.output


@pytest.mark.parametrize("value", [2.5, "three"], ids=["float", "string"])
def test_a_non_integer_n_classes_is_one_line(tmp_path, job, value):
    data = labelled(tmp_path / "d.h5", np.arange(64, dtype=np.int64) % 3, value)
    run = mpirun(2, "train", job(dataset=data), timeout=60)
    check_rejected(run, tmp_path / "run", "attribute n_classes must be an integer")


def test_a_job_file_that_is_not_utf8_is_one_line(tmp_path, job):
    path = job()
    path.write_bytes(path.read_bytes().replace(b"[model]", b"[model] # \xe9t\xe9"))
    run = mpirun(2, "train", path, timeout=60)
    check_rejected(run, tmp_path / "run", "is not UTF-8 text")


def test_a_model_file_without_its_model_attribute_is_one_line(tmp_path, small_dataset):
    model = tmp_path / "model.h5"
    with h5py.File(model, "w") as f:
        f["params/W1"] = np.zeros((12, 4), np.float32)
        f.attrs["format"] = "granger-mpi model"
        manifest.rewrite(f)
    run = mpirun(2, "evaluate", model, small_dataset, timeout=60)
    assert run.returncode == 2, run.output
    lines = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(lines) == 1 and str(model) in lines[0] and "Traceback" not in run.stderr, run.output


@pytest.mark.parametrize("content", ['{"tables": {"P2-node": {"bytes": [4], "median_us": {"ring": "x"}}}}',
                                     '{"tables": [1, 2]}', "not json {"],
                         ids=["bad-times", "tables-not-a-table", "not-json"])
def test_a_malformed_calibration_table_is_one_line(tmp_path, job, content):
    """#27 item 11: a hand-edited or truncated calibration file was a traceback (or, not
    JSON at all, silently ignored)."""
    calibration = tmp_path / "calibration.json"
    calibration.write_text(content)
    run = mpirun(2, "train", job(collectives={"algorithm": "auto"}), timeout=60,
                 env={"GRANGER_CALIBRATION": str(calibration)})
    assert run.returncode == 2, run.output
    lines = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(lines) == 1 and f"calibration file {calibration}" in lines[0], run.output
    assert "Traceback" not in run.stderr


def test_run_dir_and_job_file_names_that_are_not_utf8(tmp_path, job):
    """A path of non-UTF-8 bytes reaches Python with surrogates (was: a traceback from the
    message sent between ranks)."""
    run_dir = tmp_path / "r\udcff"          # the byte 0xff, as os.fsdecode makes it
    run = mpirun(2, "train", job(), "--run-dir", run_dir, timeout=60)
    check_rejected(run, run_dir, "--run-dir " + str(tmp_path) + "/r\\xff: the path is not valid UTF-8")
    named = tmp_path / "j\udcff.toml"
    shutil.copy(job(), named)
    run = mpirun(2, "train", named, timeout=60)
    check_rejected(run, tmp_path / "run", "\\xff.toml: the path is not valid UTF-8")


def _flip_after_the_seal(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _as_version_1(path):
    with h5py.File(path, "r+") as f:
        for key in ("format_version", *manifest.KEYS):
            del f.attrs[key]
    with open(path, "r+b") as fh:
        fh.write(bytes(512))        # no seal either


def _edit_epoch(path):
    with h5py.File(path, "r+") as f:
        f.attrs["epoch"] = 7
    with open(path, "r+b") as fh:
        fh.write(bytes(512))        # unsealed, as h5repack leaves it: the manifest must catch it


FILE_CASES = {   # command, the file it takes and how it is spoiled, the message
    "resume-damaged": ("train", "ckpt", _flip_after_the_seal, "not match its seal"),
    "resume-version-1": ("train", "ckpt", _as_version_1, "format version 1"),
    "resume-edited": ("train", "ckpt", _edit_epoch, "attribute 'epoch' differs from the manifest"),
    "resume-model-file": ("train", "model", None, "a granger-mpi model file, not a checkpoint"),
    "evaluate-damaged": ("evaluate", "model", _flip_after_the_seal, "not match its seal"),
    "predict-edited": ("predict", "ckpt", _edit_epoch, "attribute 'epoch' differs from the manifest"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_damaged_edited_or_wrong_file_is_one_line_and_nothing_is_written(case, saved_run, tmp_path, job,
                                                                           small_dataset):
    command, which, spoil, message = FILE_CASES[case]
    path = tmp_path / "given.h5"
    shutil.copyfile(saved_run / "ckpt" / "step_00000010.h5" if which == "ckpt" else saved_run / "model.h5", path)
    if spoil is not None:
        spoil(path)
    args = {"train": [job(), "--resume", path], "evaluate": [path, small_dataset],
            "predict": [path, small_dataset, tmp_path / "run"]}[command]
    run = mpirun(2, command, *args, timeout=60)
    check_rejected(run, tmp_path / "run", message)
    assert str(path) in run.stderr, run.output


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, job):
    (tmp_path / "run").write_text("not a directory")
    run = mpirun(2, "train", job(), timeout=60)
    assert run.returncode == 2, run.output
    lines = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(lines) == 1 and str(tmp_path / "run") in lines[0] and "Traceback" not in run.stderr, run.output
    assert (tmp_path / "run").read_text() == "not a directory"


def test_migrating_a_damaged_old_file_is_one_line_and_leaves_it(saved_run, tmp_path):
    path = tmp_path / "old.h5"
    shutil.copyfile(saved_run / "ckpt" / "step_00000010.h5", path)
    _as_version_1(path)
    with h5py.File(path, "r+") as f:
        f["params/W1"][0, 0] += 1
    before = path.read_bytes()
    run = granger("inspect", "--migrate", path)
    assert run.returncode == 2, run.output
    assert "/params/W1 does not match its crc32: not migrated" in run.stderr and str(path) in run.stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only file system (a tmpfs mounted ro; needs root)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as path:
        yield path


def test_a_run_dir_on_a_read_only_file_system_is_one_line(read_only_dir, job, small_dataset):
    run_dir = read_only_dir / "run"
    path = write_job(read_only_dir.parent / "job.toml", dataset=small_dataset, run_dir=run_dir)
    run = mpirun(2, "train", path, timeout=60)
    check_rejected(run, run_dir, f"[output].run_dir {run_dir} cannot be written: {read_only_dir} is on a "
                                 f"read-only file system")


def test_a_reader_that_goes_away_is_no_traceback(saved_run):
    """`granger-mpi inspect RUN | head -1`: the pipe closes early; the command stops quietly."""
    shown = subprocess.run(" ".join(map(str, [*GRANGER, "inspect", saved_run])) + " | true",
                           shell=True, capture_output=True, text=True, env=_env(), timeout=60)
    assert "Traceback" not in shown.stderr and "internal error" not in shown.stderr, shown.stderr
