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
    authorizations = []

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        Collector.bodies.append((self.headers["Content-Type"], self.rfile.read(length).decode()))
        Collector.authorizations.append(self.headers["Authorization"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    Collector.bodies, Collector.authorizations = [], []
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
    # The throttle gives the reporter's thread time to post each flush on its own.
    run = mpirun(2, "train", job, *THROTTLE, timeout=120, env={"PYTHONPATH": str(tmp_path)})
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
    assert run.stderr.count(f"reporter http://127.0.0.1:{port}/: ") == 2, run.output
    assert run.stderr.count("trying again") == 1, run.output           # once per outage
    assert "not delivered" in run.stderr and "at the end of the run: dropped" in run.stderr


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


@pytest.fixture
def trickling_collector():
    """A collector that takes each POST and answers one byte every 2 s, forever: urllib's
    per-read timeout never fires on it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def answer(conn):
        with conn:
            conn.settimeout(1.0)
            try:
                conn.recv(1 << 20)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000:
                    if stop.wait(2.0):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/slow"
    stop.set()
    server.close()


def test_a_slow_collector_never_stalls_training(small_dataset, tmp_path, trickling_collector):
    """#27 item 8: rank 0 posted in the training loop, and a collector answering a byte every
    2 s held it there for good. The POSTs go from a thread now, each with a deadline; at
    the end the queue drains for at most 10 s and what is left is dropped, and said."""
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=tmp_path / "run",
                    output={"http_url": trickling_collector, "metrics_flush_steps": 8})
    run = mpirun(2, "train", job, timeout=90)
    assert run.returncode == 0, run.output
    assert (tmp_path / "run" / "COMPLETE").exists()
    lines = [line for line in run.stderr.splitlines() if trickling_collector in line]
    assert any("dropped" in line and "not delivered" in line for line in lines), run.output


def every_stored_text(run_dir):
    """Every attribute of every HDF5 file of a run, and its text files, as one string."""
    texts = []
    for path in run_dir.rglob("*"):
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                texts += [str(v) for v in f.attrs.values()]
                f.visititems(lambda _, obj: texts.extend(str(v) for v in obj.attrs.values()))
        elif path.is_file():
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def test_credentials_in_the_collector_url_are_sent_but_never_stored_or_shown(small_dataset, tmp_path,
                                                                             collector):
    """#27 item 9: the job (with its http_url) went into every checkpoint, model.h5,
    metrics.h5 and job.toml, and into error messages."""
    url, bodies = collector
    secret_url = url.replace("http://", "http://ingest:s3cr3t-token@")
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    output={"http_url": secret_url, "metrics_flush_steps": 20},
                    checkpoint={"every_steps": 20})
    run = mpirun(2, "train", job, timeout=120)
    assert run.returncode == 0, run.output
    assert bodies and set(Collector.authorizations) == {"Basic aW5nZXN0OnMzY3IzdC10b2tlbg=="}
    assert "s3cr3t-token" not in run.output
    stored = every_stored_text(run_dir)
    assert "s3cr3t-token" not in stored and "***@127.0.0.1" in stored


def test_the_collector_url_can_come_from_the_environment(small_dataset, tmp_path, collector):
    url, bodies = collector
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    output={"http_url": "env:GRANGER_TEST_COLLECTOR", "metrics_flush_steps": 20})
    run = mpirun(2, "train", job, timeout=120, env={"GRANGER_TEST_COLLECTOR": url})
    assert run.returncode == 0, run.output
    assert bodies and url not in every_stored_text(run_dir)
    unset = mpirun(2, "train", job, "--overwrite", timeout=120)
    assert unset.returncode == 2, unset.output
    assert "GRANGER_TEST_COLLECTOR is not set" in unset.stderr, unset.output


BLOCKING_REPORTER = '''
import time

def make(run_dir, job):
    time.sleep(3600)      # a plugin waiting on a database that never answers
'''


def test_a_start_up_that_blocks_is_ended_by_the_watchdog(small_dataset, tmp_path):
    """#27 item 7: nothing bounded the start-up (here a user's reporter factory that
    blocks); the job hung forever and `status` said it was not running. The start-up is
    watched now: [fault].startup_timeout_s passes, the job ends with exit 6 naming the
    phase, and the status files said STARTING meanwhile."""
    (tmp_path / "blocking.py").write_text(BLOCKING_REPORTER)
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    output={"reporters": ["blocking:make"]}, fault={"startup_timeout_s": 3})
    run = mpirun(2, "train", job, timeout=90, env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 6, run.output
    assert "watchdog: the start-up (opening the metrics files and reporters) has not finished" \
        in run.stderr, run.output
    records = [json.loads(p.read_text()) for p in (run_dir / "status").glob("rank-*.json")]
    assert records and all(r["state"] in ("STARTING", "FAILED") for r in records), records


@pytest.mark.parametrize("finish_timeout_s, code", [(60.0, 0), (1.0, 6)])
def test_the_end_of_the_run_is_watched_by_its_own_limit(small_dataset, tmp_path, finish_timeout_s, code):
    """#27 item 5: the end (test evaluation, model.h5, COMPLETE) ran under the last step's
    limit, so an end that took longer than [fault].checkpoint_timeout_s (here 1 s; rank 0
    stalls 2.5 s at the end) was aborted after the run had trained. It is FINISHING now,
    watched by [fault].finish_timeout_s."""
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir, train={"max_steps": 20},
                    data={"test_path": str(small_dataset.with_name("small-test.h5"))},
                    fault={"checkpoint_timeout_s": 1.0, "finish_timeout_s": finish_timeout_s,
                           "status_interval_s": 0.1})
    run = mpirun(2, "train", job, "--inject-failure", "rank=0,step=20,mode=slow,at=end,seconds=2.5",
                 timeout=90)
    assert run.returncode == code, run.output
    if code == 0:
        assert (run_dir / "COMPLETE").exists()
    else:
        assert "watchdog: the end of the run (evaluating, writing model.h5) has not finished" in run.stderr, \
            run.output
        assert not (run_dir / "COMPLETE").exists()
