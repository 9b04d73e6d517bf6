"""``granger-mpi dashboard``: its JSON follows a real run under ULFM while it trains (the step
advancing, a killed rank showing as FAILED with its recovery, before the run ends) and after
it (complete); the page is served, anything else is 404; a missing run directory is one line."""

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import GRANGER, MPIRUN, ULFM_FLAGS, _env, granger
from test_checkpoint import job_file
from granger_mpi.tools import dashboard

STEPS = 96


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


@pytest.fixture
def server(tmp_path):
    """A dashboard of ``tmp_path / "run"`` on a free port; yields its base URL."""
    (tmp_path / "run").mkdir()
    proc = subprocess.Popen([*GRANGER, "dashboard", tmp_path / "run", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        yield line.split("http://", 1)[1].split("/", 1)[0].join(("http://", "/"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


def test_the_dashboard_follows_a_run_with_a_failure_and_after_it(small_dataset, tmp_path, server):
    assert dashboard.state(tmp_path / "run")["phase"] == "not started"
    job = job_file(tmp_path / "job.toml", small_dataset, tmp_path / "run",
                   output={"metrics_flush_steps": 5},
                   fault={"status_interval_s": 0.2, "step_timeout_s": 30.0},
                   collectives={"algorithm": "ring"})
    train = subprocess.Popen([*MPIRUN, "-n", "3", *ULFM_FLAGS, *GRANGER, "train", job,
                              "--overwrite", "--inject-failure", "rank=*,step=*,mode=slow,seconds=0.05",
                              "--inject-failure", "rank=2,step=50,at=compute"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                             start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        while train.poll() is None and time.monotonic() < deadline:
            status, kind, body = get(server + "api/state")
            assert status == 200 and kind == "application/json"
            seen.append(json.loads(body))
            time.sleep(0.2)
        out = train.communicate(timeout=30)[0] if train.poll() is not None else ""
        assert train.returncode == 0, out
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGUSR2)
            time.sleep(2)
            train.kill()
            pytest.fail(f"the run did not end within 120 s:\n{train.communicate()[0]}")
    running = [s for s in seen if s["phase"] == "running" and s["metrics"] and s["metrics"]["steps"]]
    assert len({s["metrics"]["steps"] for s in running}) >= 3, "the numbers did not advance"
    during = [s for s in running if any(r["state"] == "FAILED" for r in s["ranks"])]
    assert during, "the killed rank never showed while the run went on"
    assert during[0]["failed"] == 1 and during[0]["alive"] == 2
    assert len(during[-1]["metrics"]["events"]) == 1 and during[-1]["metrics"]["events"][0]["ranks_lost"] == 1

    final = json.loads(get(server + "api/state")[2])
    assert final["phase"] == "complete" and final["completion"]["steps"] == STEPS
    assert final["metrics"]["steps"] == STEPS and final["metrics"]["series"]["step"][-1] == STEPS - 1
    status, kind, page = get(server)
    assert status == 200 and kind.startswith("text/html") and b"/api/state" in page
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(server + "nothing")
    assert missing.value.code == 404


def test_a_missing_run_directory_is_one_line(tmp_path):
    run = granger("dashboard", tmp_path / "nowhere", "--port", "0")
    assert run.returncode == 2 and "run directory" in run.stderr and "not found" in run.stderr, run.output
