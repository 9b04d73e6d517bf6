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
    assert job.optimizer.schedule == "constant" and job.optimizer.clip_norm is None
    assert job.train.accumulation_steps == 1 and job.train.threads_per_rank is None


def test_new_optimizer_keys_parse(job_dir):
    job = parse(job_dir, GOOD.replace("momentum = 0.9", 'momentum = 0\nname = "adamw"\nbeta1 = 0.8\n'
                                      'schedule = "cosine"\nwarmup_steps = 10\nclip_norm = 1\n'
                                      'clip_value = 5\nscale_with_batch = true')
                   .replace("epochs = 3", "epochs = 3\naccumulation_steps = 4\nthreads_per_rank = 2")
                   .replace('kind = "mlp"', 'kind = "mlp"\nactivation = "gelu"'))
    assert (job.optimizer.name, job.optimizer.beta1, job.optimizer.schedule) == ("adamw", 0.8, "cosine")
    assert job.optimizer.clip_norm == 1.0 and job.optimizer.clip_value == 5.0
    assert job.train.accumulation_steps == 4 and job.train.threads_per_rank == 2
    assert job.model.activation == "gelu"


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
    (("momentum = 0.9", 'momentum = 0.9\nname = "lion"'), r"\[optimizer\]\.name must be one of"),
    (("momentum = 0.9", 'momentum = 0.9\nname = "adam"'), r"\[optimizer\]\.momentum is for name = 'sgd'"),
    (("momentum = 0.9", "momentum = 0.0\nnesterov = true"), r"\[optimizer\]\.nesterov needs"),
    (("momentum = 0.9", "momentum = 0.9\nnesterov = 1"), r"\[optimizer\]\.nesterov must be true or false"),
    (("momentum = 0.9", 'momentum = 0\nname = "adamw"\nbeta2 = 1.0'), r"\[optimizer\]\.beta2 must be < 1"),
    (("momentum = 0.9", 'momentum = 0\nname = "adam"\neps = 0'), r"\[optimizer\]\.eps must be > 0"),
    (("momentum = 0.9", 'momentum = 0.9\nschedule = "linear"'), r"\[optimizer\]\.schedule must be one of"),
    (("momentum = 0.9", 'momentum = 0.9\nschedule = "step"'), r"\[optimizer\]\.step_size is needed"),
    (("momentum = 0.9", "momentum = 0.9\nstep_size = 10"), r"\[optimizer\]\.step_size is only for"),
    (("momentum = 0.9", 'momentum = 0.9\nschedule = "step"\nstep_size = 5\ngamma = 0'), r"\[optimizer\]\.gamma must be > 0"),
    (("momentum = 0.9", "momentum = 0.9\nwarmup_steps = -1"), r"\[optimizer\]\.warmup_steps must be >= 0"),
    (("momentum = 0.9", "momentum = 0.9\nmin_learning_rate = 0.5"), r"\[optimizer\]\.min_learning_rate = 0.5 is above"),
    (("momentum = 0.9", "momentum = 0.9\nbase_batch = 0"), r"\[optimizer\]\.base_batch must be >= 1"),
    (("momentum = 0.9", "momentum = 0.9\nscale_with_batch = \"yes\""), r"\[optimizer\]\.scale_with_batch must be true or false"),
    (("momentum = 0.9", "momentum = 0.9\nclip_norm = 0"), r"\[optimizer\]\.clip_norm must be > 0"),
    (("momentum = 0.9", "momentum = 0.9\nclip_value = -1"), r"\[optimizer\]\.clip_value must be > 0"),
    (("epochs = 3", "epochs = 3\naccumulation_steps = 0"), r"\[train\]\.accumulation_steps must be >= 1"),
    (("epochs = 3", "epochs = 3\nthreads_per_rank = 0"), r"\[train\]\.threads_per_rank must be >= 1"),
    (("epochs = 3", "epochs = 3\nthreads_per_rank = 2.5"), r"\[train\]\.threads_per_rank must be int"),
    (('kind = "mlp"', 'kind = "mlp"\nactivation = "swish"'), r"\[model\]\.activation must be one of"),
    (("epochs = 3", 'epochs = 3\nshard_optimizer = true\n[fault]\nmode = "ulfm"'),
     r"\[train\]\.shard_optimizer needs \[fault\]\.mode = 'restart'"),
    (("epochs = 3", 'epochs = 3\nstrategy = "gossip"'), r"\[train\]\.strategy must be one of"),
    (("epochs = 3", 'epochs = 3\nstrategy = "async"\nshard_optimizer = true'),
     r"\[train\]\.shard_optimizer is for strategy = 'sync'"),
    (("epochs = 3", 'epochs = 3\nstaleness_weight = "exp"'), r"\[train\]\.staleness_weight must be one of"),
    (("epochs = 3", "epochs = 3\nmax_staleness = -1"), r"\[train\]\.max_staleness must be >= 0"),
    (('run_dir = "runs/x"', 'run_dir = "runs/x"\nhttp_url = "db.example:8086"'),
     r"\[output\]\.http_url must start with http:// or https://"),
    (('run_dir = "runs/x"', 'run_dir = "runs/x"\nreporters = ["mymodule"]'),
     r"\[output\]\.reporters entry 'mymodule' must be 'package.module:factory'"),
    (('run_dir = "runs/x"', 'run_dir = "runs/x"\nreporters = "mymodule:make"'),
     r"\[output\]\.reporters must be a list of non-empty strings"),
    (('run_dir = "runs/x"', 'run_dir = "runs/x"\ntiming_every_steps = 0'),
     r"\[output\]\.timing_every_steps must be >= 1"),
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
