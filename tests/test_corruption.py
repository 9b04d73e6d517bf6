"""Checkpoints and model files that were damaged or edited are refused by every reader,
naming the file and what is wrong (#27): the manifest, its format version, the migration
of older files, and a fuzzer of real files."""

import re
import shutil

import h5py
import pytest

from corruption import fuzz
from granger_mpi import checkpoint
from granger_mpi.errors import UserError
from granger_mpi.model import modelfile
from granger_mpi.storage import manifest, seal
from granger_mpi.tools.inspect import migrate


def copy(saved_run, tmp_path, sealed=False):
    """A copy of the run; its newest checkpoint and model file unsealed unless ``sealed``
    (as h5repack leaves them), so that the manifest's checks are what a change meets."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    newest = run_dir / "ckpt" / "step_00000020.h5"
    if not sealed:
        for path in (newest, run_dir / "model.h5"):
            with open(path, "r+b") as fh:
                fh.write(bytes(seal.USER_BLOCK))
    return run_dir, newest


def rejected_everywhere(run_dir, path, problem):
    """``path`` (the newest checkpoint) is refused by verify, resume and load, naming ``problem``."""
    assert any(problem in line for line in checkpoint.verify(path)), checkpoint.verify(path)
    reported = []
    assert checkpoint.newest_good(run_dir, report=reported.append).name == "step_00000010.h5"
    assert str(path) in reported[0] and problem in reported[0], reported
    with pytest.raises(UserError, match=re.escape(problem)) as error:
        modelfile.load(path)
    assert str(path) in str(error.value)


def test_a_good_checkpoint_and_model_file_are_sealed_and_carry_a_manifest(saved_run, tmp_path):
    for path in (saved_run / "ckpt" / "step_00000020.h5", saved_run / "model.h5"):
        assert checkpoint.verify(path) == [], path
        assert path.read_bytes().startswith(seal.MAGIC) and seal.problem(path) is None
        with h5py.File(path, "r") as f:
            assert f.attrs["format_version"] == manifest.FORMAT_VERSION
            assert "params/W1" in manifest.read(dict(f.attrs), path)[0]["datasets"]
    run_dir, path = copy(saved_run, tmp_path)
    assert checkpoint.verify(path) == [] and checkpoint.verify(run_dir / "model.h5") == []


def test_a_sealed_file_that_changed_never_reaches_hdf5(saved_run, tmp_path):
    """One byte after the user block: HDF5 is not asked (on some such bytes it crashes or
    hangs); a truncation is named as one."""
    run_dir, path = copy(saved_run, tmp_path, sealed=True)
    data = bytearray(path.read_bytes())
    data[seal.USER_BLOCK] ^= 0xFF          # HDF5's own superblock signature
    path.write_bytes(bytes(data))
    rejected_everywhere(run_dir, path, "its bytes do not match its seal")
    path.write_bytes(bytes(data[:len(data) // 2]))
    rejected_everywhere(run_dir, path, "sealed (truncated or grown)")


def test_swapped_datasets_of_the_same_shape_are_refused(saved_run, tmp_path):
    """Each keeps its own crc32 attribute: only the manifest tells them apart."""
    run_dir, path = copy(saved_run, tmp_path)
    with h5py.File(path, "r+") as f:
        f.move("params/b1", "swapping")
        f.move("optimizer/velocity/b1", "params/b1")
        f.move("swapping", "optimizer/velocity/b1")
    rejected_everywhere(run_dir, path, "/b1: checksum mismatch")


def test_an_edited_attribute_is_refused(saved_run, tmp_path):
    run_dir, path = copy(saved_run, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["epoch"] = f.attrs["epoch"] + 1
    rejected_everywhere(run_dir, path, "attribute 'epoch' differs from the manifest")


def test_an_older_file_is_refused_naming_the_migration_and_migrated_once_checked(saved_run, tmp_path):
    run_dir, path = copy(saved_run, tmp_path)
    model = run_dir / "model.h5"
    for each in (path, model):
        with h5py.File(each, "r+") as f:       # as granger-mpi 0.1 wrote them
            for key in ("format_version", *manifest.KEYS):
                del f.attrs[key]
            if each == model:
                for name in manifest.datasets(f):
                    del f[name].attrs["crc32"]
    problem = "format version 1 (granger-mpi 0.1, before manifests)"
    rejected_everywhere(run_dir, path, problem)
    assert f"inspect --migrate {path}" in checkpoint.verify(path)[0]
    broken = run_dir / "ckpt" / "step_00000010.h5"
    shutil.copyfile(path, broken)
    with h5py.File(broken, "r+") as f:
        f["params/W1"][0, 0] += 1
    with pytest.raises(UserError, match="/params/W1 does not match its crc32: not migrated"):
        migrate(broken)
    assert "migrated to format version 2" in migrate(path) and "migrated" in migrate(model)
    assert checkpoint.verify(path) == [] and checkpoint.verify(model) == []
    assert "nothing to migrate" in migrate(path)


def test_a_file_of_a_newer_format_version_is_refused(saved_run, tmp_path):
    run_dir, path = copy(saved_run, tmp_path)
    with h5py.File(path, "r+") as f:
        manifest.rewrite(f)
        f.attrs["format_version"] = manifest.FORMAT_VERSION + 1
    rejected_everywhere(run_dir, path, "written by a newer granger-mpi")


def test_fuzzed_checkpoints_and_model_files_no_harmful_mutation_is_accepted(saved_run, tmp_path):
    """200 mutations with a fixed seed (scripts/fuzz-checkpoints runs more)."""
    tally = fuzz(saved_run, 200, seed=27, work=tmp_path)
    print(tally, tally.kinds)
    assert tally.harmful >= 150 and len(tally.kinds) == 6, (str(tally), tally.kinds)
    assert tally.accepted == [], tally.accepted[:20]
    # HDF5 crashing or hanging is caught only where a seal keeps the bytes from it
    assert [c for c in tally.crashed if not c[0].startswith("unsealed")] == [], tally.crashed
