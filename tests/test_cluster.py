"""Collectives across emulated hosts (network namespaces, scripts/cluster), over TCP.

Skipped, with the reason shown, where namespaces cannot be made (not root, no iproute2).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from conftest import GRANGER, MPIRUN, PYTHON, THROTTLE, ROOT, _env, blas_thread_counts, run_command
from test_checkpoint import job_file, wait_for_line
from test_fault import assert_every_sample_once

CLUSTER = ROOT / "scripts" / "cluster"
PROGRAM = ROOT / "tests" / "programs" / "check_collectives.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three hosts with two slots each, under test-only names and addresses."""
    if os.geteuid() != 0:
        pytest.skip("emulated hosts need root (network namespaces)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("emulated hosts need iproute2 ('ip', 'tc')")
    env = dict(os.environ, GRANGER_CLUSTER_PREFIX="gmpt", GRANGER_CLUSTER_SUBNET="10.251.0",
               GRANGER_CLUSTER_DIR=str(tmp_path_factory.mktemp("cluster") / "state"))
    made = subprocess.run([PYTHON, CLUSTER, "up", "--hosts", "3", "--slots", "2"], env=env,
                          capture_output=True, text=True, timeout=60)
    if made.returncode != 0 and "Operation not permitted" in made.stderr:
        pytest.skip(f"cannot make network namespaces here: {made.stderr.strip()}")
    assert made.returncode == 0, made.stderr
    yield env
    subprocess.run([PYTHON, CLUSTER, "down"], env=env, capture_output=True, timeout=60)


@pytest.mark.parametrize("ranks,layout", [(4, "2 hosts x 2"), (6, "3 hosts x 2"), (5, "2+2+1")])
def test_collectives_across_hosts_match_mpi_allreduce(cluster, ranks, layout):
    """ring, rhd, rd, hierarchical (node split by host), auto, native; shm must refuse."""
    run = run_command([PYTHON, CLUSTER, "run", "-n", str(ranks), "--", PYTHON, PROGRAM, "-", "65539"],
                      timeout=240, env=cluster)
    assert run.returncode == 0, run.output
    hosts = 2 if ranks == 4 else 3
    assert f"checked P={ranks} on {hosts} node(s), native, ring, rhd, rd, hierarchical, auto: " \
           f"0 failure(s)" in run.stdout, run.output


def test_ranks_on_hosts_of_one_kernel_share_its_cpus(cluster, small_dataset, tmp_path):
    """Emulated hosts have names of their own but one kernel: one rank on each of 2 hosts
    gets half the usable CPUs each, not all of them (the launcher counts 1 rank per host)."""
    from granger_mpi.mpi.threads import usable_cpus
    job = job_file(tmp_path / "a.toml", small_dataset, tmp_path / "run", train={"max_steps": 3})
    run = run_command([PYTHON, CLUSTER, "run", "-n", "2", "--map-by", "node", "--", *GRANGER,
                       "train", str(job)], timeout=120, env=cluster)
    assert run.returncode == 0, run.output
    share = max(1, usable_cpus() // 2)
    assert f"{share} thread(s) per rank (BLAS: " in run.stdout, run.stdout
    assert blas_thread_counts(run.stdout) and set(blas_thread_counts(run.stdout)) == {share}, run.stdout


TORCH_SITE = ROOT / ".bench-site"
needs_torch = pytest.mark.skipif(not (TORCH_SITE / "torch").is_dir(),
                                 reason="PyTorch is only in the benchmark environment (.bench-site)")


@needs_torch
def test_bench_allreduce_against_gloo_runs_across_hosts(cluster, tmp_path):
    """#26: gloo's rendezvous at rank 0's address and its pairs bound to the hosts'
    interface (before: a hard-coded 127.0.0.1, and the run hung)."""
    run = run_command([PYTHON, CLUSTER, "run", "-n", "2", "--map-by", "node", "--", "env",
                       f"PYTHONPATH={TORCH_SITE}", *GRANGER, "bench", "allreduce", "--torch",
                       "--torch-timeout", "30", "--algorithms", "ring", "--min-bytes", "4096",
                       "--max-bytes", "8192", "--rounds", "1", "--out", str(tmp_path)],
                      timeout=180, env=cluster)
    assert run.returncode == 0, run.output
    rows = (tmp_path / "allreduce_p2.csv").read_text()
    assert rows.count("torch-gloo,") == 2, rows


@needs_torch
def test_a_gloo_peer_that_cannot_connect_fails_clearly_within_its_timeout(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(TORCH_SITE), MASTER_ADDR="192.0.2.1")   # TEST-NET-1
    started = time.monotonic()
    run = run_command([*MPIRUN, "-n", "2", *GRANGER, "bench", "allreduce", "--torch", "--torch-timeout",
                       "5", "--algorithms", "ring", "--max-bytes", "4096", "--out", str(tmp_path)],
                      timeout=120, env=env)
    assert run.returncode == 2, run.output
    # Whichever rank's connect times out first reports and ends the job.
    assert re.search(r"gloo could not connect rank [01] to tcp://192\.0\.2\.1:\d+ within 5 s", run.output), run.output
    assert time.monotonic() - started < 60     # the timeout, torch's import and MPI's start-up


def test_cluster_refuses_names_it_did_not_make(cluster, tmp_path):
    env = dict(cluster, GRANGER_CLUSTER_DIR=str(tmp_path / "other-state"))
    again = subprocess.run([PYTHON, CLUSTER, "up", "--hosts", "2"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1
    assert "refusing to touch gmpt1, gmpt2" in again.stderr
    status = subprocess.run([PYTHON, CLUSTER, "status"], env=cluster, capture_output=True, text=True,
                            timeout=30)
    assert status.returncode == 0 and status.stdout.count(" up") == 3


def namespace_pids(cluster, host, pattern=None):
    """Processes running inside an emulated host, optionally those whose command matches."""
    name = f"{cluster['GRANGER_CLUSTER_PREFIX']}{host}"
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    if pattern is None:
        return [int(p) for p in pids]
    found = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if pattern in command:
            found.append(int(pid))
    return found


def start_training(cluster, job, log_dir, *extra, hosts=None):
    """``scripts/cluster run --ft`` a training job across the hosts, output piped."""
    cmd = [PYTHON, CLUSTER, "run", "--ft", *(["--hosts", str(hosts)] if hosts else []), "--",
           *GRANGER, "train", str(job), "--row-log", str(log_dir), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(cluster), start_new_session=True)


def finish(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"did not end by itself within {timeout} s\n{out[-4000:]}\n{err[-4000:]}")
    return out, err


def test_node_failure_under_ulfm_survivors_on_other_hosts_finish(cluster, small_dataset, tmp_path):
    """Both ranks of host 3 are SIGKILLed mid-run (its daemon stays): the four ranks on hosts
    1 and 2 shrink, re-split the epoch and finish; every sample once per epoch."""
    run_dir, log_dir = tmp_path / "run", tmp_path / "rows"
    log_dir.mkdir()
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 30},
                   output={"progress_interval_s": 0.0}, collectives={"algorithm": "ring"})
    # rank 4 (host 3) pauses at step 102, so the run cannot end before the kill, however fast
    proc = start_training(cluster, job, log_dir, *THROTTLE,
                          "--inject-failure", "rank=4,step=102,mode=slow,seconds=120")
    lines = wait_for_line(proc, "step 100/", timeout=120)
    victims = namespace_pids(cluster, 3, "granger_mpi train")
    assert len(victims) == 2, victims
    killed = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, err = finish(proc, 240)
    out = "".join(lines) + out
    assert (run_dir / "COMPLETE").exists(), f"{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    record = json.loads((run_dir / "COMPLETE").read_text())
    assert record["world_size"] == 4 and sorted(record["lost_world_ranks"]) == [4, 5], record
    assert_every_sample_once(log_dir, 30)
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        detected = float(f["events"]["time"][0])
        shrink = float(f["events"]["recovery_s"][:].sum())
        first = detected + float(f["events"]["first_step_s"][-1]) - killed
    print(f"host 3's ranks killed: detected after {detected - killed:.3f} s, revoke+shrink+agree "
          f"{shrink:.3f} s, first step after {first:.3f} s; {out.count('rank failure at')} recoveries")


def test_whole_host_loss_ends_the_job_and_restart_resumes_on_the_others(cluster, small_dataset,
                                                                       tmp_path):
    """Host 3 vanishes, daemon and all: the job must end by itself (no Finalize hang); the
    restart on hosts 1 and 2 resumes from the newest good checkpoint and finishes."""
    run_dir, log_dir = tmp_path / "run", tmp_path / "rows"
    log_dir.mkdir()
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 30},
                   output={"progress_interval_s": 0.0}, checkpoint={"every_steps": 50})
    # rank 4 (host 3) pauses at step 202, so the run cannot end before the kill, however fast
    proc = start_training(cluster, job, log_dir, *THROTTLE,
                          "--inject-failure", "rank=4,step=202,mode=slow,seconds=120")
    wait_for_line(proc, "step_00000200.h5 (step 200)", timeout=120)   # saved and verified
    victims = namespace_pids(cluster, 3)
    assert len(victims) >= 3, victims          # prted and two ranks
    killed = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, err = finish(proc, 120)
    ended = time.time() - killed
    assert not (run_dir / "COMPLETE").exists()
    print(f"whole host lost: the job ended by itself {ended:.1f} s later (mpirun exit {proc.returncode})")
    resumed = start_training(cluster, job, log_dir, "--resume", "auto", hosts=2)
    out, err = finish(resumed, 240)
    assert (run_dir / "COMPLETE").exists(), f"{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    record = json.loads((run_dir / "COMPLETE").read_text())
    assert record["world_size"] == 4 and record["steps"] == 30 * 32, record
    step = int(re.search(r"resuming from \S+: step (\d+)", out).group(1))
    assert step >= 200 and step % 50 == 0, out[-3000:]
