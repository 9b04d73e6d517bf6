"""``predict`` and ``evaluate`` on model files and checkpoints."""

import h5py
import numpy as np

from conftest import granger, mpirun


def test_predict_and_evaluate_from_model_and_checkpoint(small_dataset, reference_run, tmp_path):
    test_file = small_dataset.with_name("small-test.h5")
    _, run_dir = reference_run(2)
    ckpt = run_dir / "ckpt" / "step_00000064.h5"     # the final checkpoint: model.h5's parameters
    from_model = mpirun(2, "predict", run_dir / "model.h5", test_file, tmp_path / "a.h5", timeout=120)
    from_ckpt = mpirun(2, "predict", ckpt, test_file, tmp_path / "b.h5", timeout=120)
    for run in (from_model, from_ckpt):
        assert run.returncode == 0, run.output
        assert "predictions for 500 rows" in run.stdout
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b, \
            h5py.File(test_file, "r") as data:
        assert a.attrs["format"] == "granger-mpi predictions"
        assert np.array_equal(a["outputs"][...], b["outputs"][...])   # same params and P, same bits
        assert a["outputs"].shape == (500, 4) and a["probabilities"].shape == (500, 4)
        np.testing.assert_allclose(a["probabilities"][...].sum(axis=1), 1, rtol=1e-5)
        assert np.array_equal(a["labels"][...], a["outputs"][...].argmax(axis=1))
        accuracy = 100 * (a["labels"][...] == data["y"][...]).mean()
    evaluated = granger("evaluate", ckpt, test_file)
    assert evaluated.returncode == 0, evaluated.output
    assert f"accuracy {accuracy:.2f}%" in evaluated.stdout

    wrong = granger("predict", ckpt, small_dataset.with_name("nope.h5"), tmp_path / "c.h5")
    assert wrong.returncode == 2 and "nope.h5 not found" in wrong.stderr
    not_model = granger("predict", test_file, test_file, tmp_path / "c.h5")
    assert not_model.returncode == 2 and "not a granger-mpi model file or checkpoint" in not_model.stderr
    other = tmp_path / "other.h5"
    assert granger("make-dataset", other, "--rows", "10", "--features", "3").returncode == 0
    misfit = granger("predict", ckpt, other, tmp_path / "c.h5")
    assert misfit.returncode == 2 and "/X has 3 features, the model takes 12" in misfit.stderr
    assert not (tmp_path / "c.h5").exists()
