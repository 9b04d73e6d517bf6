"""Per-rank time split and reporters, on real multi-rank runs: a straggler shows as the
others' wait; metrics.jsonl, an HTTP collector and a user's reporter get the same records as
metrics.h5; a resumed run records no step twice; a monitoring outage does not stop training."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h5py
import numpy as np
import pytest

from conftest import THROTTLE, granger, mpirun, write_job

STEPS = 64    # small_dataset: 2,000 rows, global batch 64, 2 epochs


def read_group(path, name):
    with h5py.File(path, "r") as f:
        return {key: dset[...] for key, dset in f[name].items()}


def jsonl_records(path, kind):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def test_a_straggler_shows_as_the_other_ranks_wait(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    output={"timing_every_steps": 10}, fault={"mode": "restart"})
    run = mpirun(3, "train", job, "--inject-failure", "rank=1,step=5,mode=slow,seconds=1.5",
                 timeout=120)
    assert run.returncode == 0, run.output
    t = read_group(run_dir / "metrics.h5", "ranks")
    assert t["step"].tolist() == [9, 19, 29, 39, 49, 59, 63]
    assert t["steps"].tolist() == [10] * 6 + [4]
    assert t["compute_s"].shape == (7, 3)
    # Window 0 holds step 5: rank 1 computed 1.5 s longer; ranks 0 and 2 waited for it.
    assert t["compute_s"][0, 1] >= 1.5
    assert min(t["wait_s"][0, 0], t["wait_s"][0, 2]) >= 1.2, t["wait_s"][0]
    assert t["wait_s"][0, 1] < 0.3, t["wait_s"][0]
    # wait = comm - least comm in the window: the straggler has none, nobody goes below 0.
    assert np.all(np.min(t["wait_s"], axis=1) == 0) and np.all(t["wait_s"] >= 0)
    assert np.all(t["wait_s"][1:] < 1.0), t["wait_s"]


class Collector(BaseHTTPRequestHandler):
    """Keeps every POSTed body (a JSON-lines batch)."""

    bodies = []

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        Collector.bodies.append((self.headers["Content-Type"], self.rfile.read(length).decode()))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    Collector.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ingest", Collector.bodies
    server.shutdown()
    server.server_close()


USER_REPORTER = '''
import json
from granger_mpi.reporters import Reporter

class Counting(Reporter):
    def __init__(self, path):
        self.path, self.steps, self.windows = path, [], 0
    def step(self, row):
        self.steps.append(row["step"])
    def timings(self, row):
        self.windows += 1
    def close(self):
        self.path.write_text(json.dumps({"steps": self.steps, "windows": self.windows}))

def make(run_dir, job):
    return Counting(run_dir / "counted.json")

def broken(run_dir, job):
    raise RuntimeError("no database at db.example:5432")
'''


def test_jsonl_http_and_a_users_reporter_get_what_metrics_h5_gets(small_dataset, tmp_path, collector):
    url, bodies = collector
    (tmp_path / "userreporter.py").write_text(USER_REPORTER)
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    output={"timing_every_steps": 16, "metrics_flush_steps": 20, "jsonl": True,
                            "http_url": url, "reporters": ["userreporter:make"]})
    run = mpirun(2, "train", job, timeout=120, env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.output
    text = (run_dir / "metrics.jsonl").read_text()
    steps = jsonl_records(run_dir / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == list(range(STEPS))
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        assert [r["loss"] for r in steps] == f["loss"][...].tolist()    # bitwise: JSON keeps float64
    windows = jsonl_records(run_dir / "metrics.jsonl", "timings")
    assert [w["step"] for w in windows] == [15, 31, 47, 63]
    assert all(len(w["comm_s"]) == 2 for w in windows)
    # The collector got the same lines, in batches, as JSON lines.
    assert {kind for kind, _ in bodies} == {"application/x-ndjson"}
    assert len(bodies) > 1 and "".join(body for _, body in bodies) == text
    counted = json.loads((run_dir / "counted.json").read_text())
    assert counted == {"steps": list(range(STEPS)), "windows": 4}


def test_a_users_reporter_that_fails_stops_every_rank_with_its_message(small_dataset, tmp_path):
    (tmp_path / "userreporter.py").write_text(USER_REPORTER)
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=tmp_path / "run",
                    output={"reporters": ["userreporter:broken"]})
    run = mpirun(2, "train", job, timeout=120, env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 2, run.output
    assert "userreporter:broken" in run.stderr and "no database at db.example:5432" in run.stderr


def test_an_unreachable_collector_is_reported_once_and_training_goes_on(small_dataset, tmp_path):
    with socket.socket() as s:    # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=tmp_path / "run",
                    output={"http_url": f"http://127.0.0.1:{port}/", "metrics_flush_steps": 8})
    run = mpirun(2, "train", job, timeout=120)
    assert run.returncode == 0, run.output
    assert run.stderr.count(f"reporter http://127.0.0.1:{port}/") == 1, run.output


def test_a_restarted_run_records_no_step_or_window_twice(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    checkpoint={"every_steps": 10},
                    output={"timing_every_steps": 8, "jsonl": True, "metrics_flush_steps": 4},
                    fault={"mode": "restart"})
    run = granger("run", job, "-n", "2", "--max-restarts", "1", "--backoff", "0",
                  "--inject-failure", "rank=1,step=25,mode=kill9", *THROTTLE, timeout=240)
    assert run.returncode == 0, run.output
    assert "restart 1/1" in run.output
    steps = [r["step"] for r in jsonl_records(run_dir / "metrics.jsonl", "step")]
    assert steps == list(range(STEPS))
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        assert f["step"][...].tolist() == list(range(STEPS))
        assert f["ranks/step"][...].tolist() == [7, 15, 23, 31, 39, 47, 55, 63]
    windows = [r["step"] for r in jsonl_records(run_dir / "metrics.jsonl", "timings")]
    assert windows == [7, 15, 23, 31, 39, 47, 55, 63]
