"""The training layer's parts, in-process (plain pytest, no mpirun), and the public API."""

import json
import os
import signal
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from conftest import mpirun, mpirun_script, read_params, write_job
from granger_mpi import config
from granger_mpi.training.outputs import Outputs
from granger_mpi.checkpoint import CheckpointPolicy
from granger_mpi.training.requests import RequestSource
from granger_mpi.training.state import TrainState


def test_train_state_commit_and_restore_one_step():
    params, opt = np.arange(4, dtype=np.float32), np.ones(4, np.float32)
    state = TrainState(params, opt, 7, rollback=True)
    state.commit()
    params += 1
    opt *= 3
    state.step = 8
    state.restore(8)                     # already there: nothing changes
    assert state.step == 8 and params[0] == 1
    state.restore(7)
    assert state.step == 7
    assert np.array_equal(params, np.arange(4)) and np.array_equal(opt, np.ones(4))
    assert state.params is params        # in place: the optimizer keeps its views
    with pytest.raises(RuntimeError, match="cannot roll back from step 7 to 5"):
        state.restore(5)


def test_train_state_without_rollback_refuses_to_go_back():
    state = TrainState(np.zeros(2, np.float32), np.zeros(2, np.float32), 3, rollback=False)
    state.commit()
    state.step = 4
    with pytest.raises(RuntimeError, match="only the last committed step"):
        state.restore(3)


def ckpt(**kw):
    return SimpleNamespace(**{"every_steps": None, "every_seconds": None, "at_end": True, **kw})


def test_checkpoint_policy():
    policy = CheckpointPolicy(ckpt(every_steps=10), total_steps=30)
    assert [s for s in range(1, 31) if policy.due(s, requested=False)] == [10, 20]  # 30: at_end
    assert policy.due(3, requested=True) and not policy.due(30, requested=True)
    assert not CheckpointPolicy(ckpt(), 30).due(10, requested=False)
    names = lambda step: f"step_{step:08d}.h5"         # noqa: E731
    assert policy.due_at_end(30, 0, None, names)
    assert not policy.due_at_end(30, 0, SimpleNamespace(name="step_00000030.h5"), names)
    assert policy.due_at_end(30, 0, SimpleNamespace(name="step_00000020.h5"), names)
    assert not policy.due_at_end(12, 12, None, names)          # a resumed run that did no step
    assert not CheckpointPolicy(ckpt(at_end=False), 30).due_at_end(30, 0, None, names)
    timed = CheckpointPolicy(ckpt(every_seconds=5.0), 30)
    assert not timed.timed_save_due()
    timed.last_save -= 6
    assert timed.timed_save_due()
    timed.saved()
    assert not timed.timed_save_due()


def test_request_source_signals_stop_file_and_clock(tmp_path):
    policy = CheckpointPolicy(ckpt(every_seconds=100.0), 10)
    stop = tmp_path / "STOP"
    watcher = RequestSource(policy, stop, watcher=True)
    other = RequestSource(policy, stop, watcher=False)
    before = signal.getsignal(signal.SIGUSR1)
    with watcher:
        assert watcher.take() == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.take() == (True, False)
        assert watcher.take() == (True, False)             # kept until served: a redone step asks again
        watcher.served()
        assert watcher.take() == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        watcher.served()                                   # one that came during a save is served by it
        assert watcher.take() == (False, False)
        stop.touch()
        assert other.take() == (False, False)              # only the watcher reads the file
        assert watcher.take() == (True, True)
        policy.last_save -= 101
        other.stop_honoured()
        assert stop.exists()
        watcher.stop_honoured()
        assert not stop.exists()
        assert watcher.take() == (True, False)             # the clock asks for a save
    assert signal.getsignal(signal.SIGUSR1) == before


def small_job(tmp_path, dataset, **sections):
    path = write_job(tmp_path / "job.toml", dataset=dataset, run_dir=tmp_path / "run", **sections)
    return config.load(path)


class Rank:
    """A communicator of which only the rank is asked (pure bookkeeping)."""

    def __init__(self, rank, size=3):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


def step_record(step):
    return {"step": step, "epoch": 0, "loss": 1.0, "accuracy": 0.5, "grad_norm": 1.0,
            "learning_rate": 0.1, "step_time_s": 0.01, "samples_per_s": 6400.0,
            "val_loss": float("nan"), "val_accuracy": float("nan")}


def test_outputs_off_the_writer_rank_write_nothing_until_it_takes_over(tmp_path, small_dataset):
    job = small_job(tmp_path, small_dataset)
    lines = []
    outputs = Outputs(Rank(1), job, total_steps=10, log=lines.append)
    outputs.log("not printed")
    for step in range(5):
        outputs.step(step_record(step), since_start=step, epoch=0, loss=1.0, accuracy=0.5, samples=64,
                     detail=lambda: pytest.fail("a non-writer built a progress line"))
    outputs.timings(0, None)
    outputs.flush()
    outputs.final_model(None, None, steps=10, world_size=3)
    outputs.completion(steps=10, world_size=3, lost=[], test_scores=(None, None))
    assert lines == [] and not (tmp_path / "run").exists()
    # rank 0 died having written nothing: this rank is rank 0 of the shrunk communicator,
    # rolls back to step 4 (step 4 was not completed everywhere) and writes what it kept
    (tmp_path / "run").mkdir()
    recovered = SimpleNamespace(gone=[0], step=4, detected=0.0, seconds=0.1, replaced={},
                                split=dict(revoke_s=0.0, shrink_s=0.1, agree_s=0.0, transfer_s=0.0))
    outputs.failure(Rank(0, 2), recovered, where="the allreduce (ring)", error="proc failed",
                    lost_at=4, entered=0.0)
    assert outputs.writer
    assert any("rank failure at step 4" in line and "2 continue from step 4" in line for line in lines)
    for step in (4, 3):     # a record it holds already (3) is not written twice
        outputs.step(step_record(step), since_start=4, epoch=0, loss=1.0, accuracy=0.5, samples=64,
                     detail=lambda: "")
    outputs.close()
    with h5py.File(tmp_path / "run" / "metrics.h5", "r") as f:
        assert list(f["step"][...]) == [0, 1, 2, 3, 4]
        assert f["events"]["step"][0] == 4


def test_api_train_on_comm_self_matches_the_command_line(tmp_path, small_dataset):
    """A whole Trainer in this process, through the public API, and the CLI at P = 1."""
    import granger_mpi as g
    from mpi4py import MPI
    path = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=tmp_path / "api",
                     train={"max_steps": 40}, checkpoint={"every_steps": 20})
    lines = []
    summary = g.train(MPI.COMM_SELF, g.load_job(path), overwrite=True, log=lines.append)
    assert isinstance(summary, g.Summary)
    assert (summary.outcome, summary.exit_code, summary.steps, summary.world_size) == ("completed", 0, 40, 1)
    assert summary.checkpoint.endswith("step_00000040.h5") and summary.test_loss is None
    assert any(line.startswith("done: 40 steps in") for line in lines)
    on_disk = json.loads((tmp_path / "api" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary.to_json()))
    assert {"outcome", "exit_code", "steps", "seconds", "train_seconds", "samples_per_s", "final_loss",
            "final_accuracy", "test_loss", "test_accuracy", "world_size", "ranks_lost", "checkpoint",
            "run_dir"} <= set(on_disk)
    # 2,000 rows in 32 steps of 64 (the last of 16), then 8 full steps of the next epoch
    assert on_disk["samples_per_s"] == pytest.approx((2000 + 8 * 64) / on_disk["train_seconds"])
    cli = mpirun(1, "train", path, "--run-dir", tmp_path / "cli", timeout=120)
    assert cli.returncode == 0, cli.output
    assert np.array_equal(read_params(tmp_path / "api" / "model.h5").view(np.uint32),
                          read_params(tmp_path / "cli" / "model.h5").view(np.uint32))
    loss, accuracy = g.evaluate(MPI.COMM_SELF, tmp_path / "api" / "model.h5", small_dataset)
    assert 0 < loss < 10 and 0 <= accuracy <= 1


API_UNDER_MPIRUN = """
    import sys
    import granger_mpi as g
    from mpi4py import MPI
    summary = g.train(MPI.COMM_WORLD, g.load_job(sys.argv[1], sys.argv[2]), overwrite=True,
                      log=lambda line: None)
    assert summary.exit_code == 0 and summary.world_size == 2, summary
"""


def test_the_api_under_mpirun_gives_the_command_lines_bits(tmp_path, small_dataset):
    path = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=tmp_path / "cli")
    cli = mpirun(2, "train", path, timeout=120)
    assert cli.returncode == 0, cli.output
    api = mpirun_script(2, API_UNDER_MPIRUN, path, tmp_path / "api", tmp_path=tmp_path, timeout=120)
    assert api.returncode == 0, api.output
    assert np.array_equal(read_params(tmp_path / "api" / "model.h5").view(np.uint32),
                          read_params(tmp_path / "cli" / "model.h5").view(np.uint32))


ROLL_BACK = """
    import os
    import numpy as np
    from mpi4py import MPI
    from granger_mpi.training.recovery import UlfmRecovery
    from granger_mpi.training.spares import Roles
    from granger_mpi.training.state import TrainState
    from granger_mpi.mpi.ulfm import RankFailure, rank_failures
    comm = MPI.COMM_WORLD.Dup()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    rank = comm.Get_rank()
    params, opt = np.full(3, 5.0, np.float32), np.zeros(3, np.float32)
    state = TrainState(params, opt, 10, rollback=True)
    state.commit()
    if rank == 1:            # applied step 10, which the others did not finish
        params += 1.0
        opt += 2.0
        state.step = 11
    recovery = UlfmRecovery(comm, Roles.initial(comm.Get_size(), 0))
    comm.Barrier()
    if rank == 2:
        os._exit(1)          # dies: the others learn it in their next collective
    try:
        with rank_failures(comm, "a test allreduce"):
            while True:
                comm.Allreduce(MPI.IN_PLACE, np.zeros(1), op=MPI.SUM)
    except RankFailure as failure:
        # rank 0 is ready for step 10; rank 1 applied step 10 but not its checkpoint yet
        place = (state.step, 0 if rank == 1 else 1)
        recovered = recovery.recover(comm, lambda: place,
                                     lambda comm, place, replaced: state.restore(place[0]))
    assert recovered.place == (10, 1) and state.step == 10, (rank, recovered, state.step)
    assert np.all(params == 5.0) and np.all(opt == 0.0), (rank, params, opt)
    assert recovered.gone == [2] and recovery.idents == [0, 1] and recovery.lost == [2], recovered
    assert recovered.comm.Get_size() == 2 and recovery.generation == 1
    print("rank", rank, "rolled back to", recovered.step, flush=True)
    recovered.comm.Barrier()   # both have printed before either leaves
    os._exit(0)            # MPI_Finalize can hang once a peer has died
"""


def test_roll_back_bookkeeping_under_mpirun_3(tmp_path):
    """A real failure under ULFM: rank 2 dies, rank 1 had applied a step rank 0 had not
    finished; both survivors agree on the earlier place (step, then phase), rank 1 restores
    its commit, and the membership records who was lost."""
    from conftest import ULFM_FLAGS
    run = mpirun_script(3, ROLL_BACK, tmp_path=tmp_path, timeout=60, mpirun_args=ULFM_FLAGS)
    assert sorted(line for line in run.stdout.splitlines() if "rolled back" in line) == [
        "rank 0 rolled back to 10", "rank 1 rolled back to 10"], run.output
