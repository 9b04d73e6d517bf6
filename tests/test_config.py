"""Job files: good ones parse, bad ones fail with a message naming the key or file."""

import pytest

from granger_mpi import config
from granger_mpi.errors import UserError

GOOD = """
[data]
path = "train.h5"
[model]
kind = "mlp"
hidden = [32, 16]
[optimizer]
learning_rate = 0.1
momentum = 0.9
[train]
global_batch = 128
epochs = 3
[output]
run_dir = "runs/x"
"""


@pytest.fixture
def job_dir(tmp_path):
    (tmp_path / "train.h5").write_bytes(b"")
    return tmp_path


def parse(job_dir, text):
    path = job_dir / "job.toml"
    path.write_text(text)
    return config.load(path)


def test_good_job_parses_with_defaults_and_relative_paths(job_dir):
    job = parse(job_dir, GOOD)
    assert job.model.hidden == (32, 16)
    assert job.optimizer.learning_rate == 0.1
    assert job.train.seed == 0 and job.collectives.algorithm == "auto"
    assert job.data.path == job_dir / "train.h5"       # relative to the job file
    assert job.output.run_dir == job_dir / "runs" / "x"
    assert '"hidden": [32, 16]' in job.to_json()


@pytest.mark.parametrize("change,message", [
    (("[train]", "[train]\nbogus = 1"), r"unknown key \[train\]\.bogus"),
    (("learning_rate = 0.1", "learning_rate = -0.1"), r"\[optimizer\]\.learning_rate must be > 0"),
    (("epochs = 3", 'epochs = "3"'), r"\[train\]\.epochs must be int, got str"),
    (("epochs = 3", "epochs = 0"), r"\[train\]\.epochs must be >= 1"),
    (("momentum = 0.9", "momentum = 1.5"), r"\[optimizer\]\.momentum must be <= 1"),
    (("hidden = [32, 16]", "hidden = [32, 0]"), r"\[model\]\.hidden must be >= 1"),
    (('kind = "mlp"', 'kind = "cnn"'), r"\[model\]\.kind must be one of"),
    (('kind = "mlp"', 'kind = "softmax"'), r"\[model\]\.hidden is only for kind = 'mlp'"),
    (("global_batch = 128", ""), r"missing key \[train\]\.global_batch"),
    (('path = "train.h5"', 'path = "nope.h5"'), r"\[data\]\.path: dataset file .*nope\.h5 not found"),
    (("[output]", "[collectives]\nalgorithm = \"magic\"\n[output]"), r"\[collectives\]\.algorithm must be one of"),
    (("[output]", "[extra]\n[output]"), r"unknown section \[extra\]"),
    (("epochs = 3", "epochs = 3\nepochs = 4"), r"not valid TOML"),
])
def test_bad_job_names_the_key(job_dir, change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(UserError, match=message):
        parse(job_dir, GOOD.replace(old, new))


def test_missing_job_file(tmp_path):
    with pytest.raises(UserError, match="job file .*missing.toml not found"):
        config.load(tmp_path / "missing.toml")


def test_missing_section(job_dir):
    with pytest.raises(UserError, match=r"missing section \[optimizer\]"):
        parse(job_dir, GOOD.replace("[optimizer]\nlearning_rate = 0.1\nmomentum = 0.9\n", ""))


def test_run_dir_from_the_command_line_replaces_the_job_files(job_dir, tmp_path, monkeypatch):
    path = job_dir / "job.toml"
    path.write_text(GOOD)
    monkeypatch.chdir(tmp_path)
    job = config.load(path, run_dir="runs/slurm-name")  # relative to the working directory
    assert job.output.run_dir == tmp_path / "runs" / "slurm-name"
    assert job.data.path == job_dir / "train.h5" and job.text == GOOD
    assert config.load(path).output.run_dir == job_dir / "runs" / "x"
