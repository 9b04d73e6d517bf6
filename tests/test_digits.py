"""Real data: scikit-learn's digits, trained at P = 4, against scikit-learn's own models.

Issue #8's yardstick: softmax regression and an MLP trained by ``mpirun -n 4 granger-mpi
train`` on a dataset brought in with ``import-dataset`` reach a test accuracy within 1
point of ``LogisticRegression`` and ``MLPClassifier`` on the same split (450 test rows,
so 1 point is 4.5 rows). Run with ``-s`` to see the numbers.
"""

import numpy as np
import pytest

from conftest import granger, mpirun, write_job

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is not installed (requirements.txt pins it; "
                                                "run scripts/bootstrap)")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits (8x8 images, 10 classes) scaled to [0, 1], split 75/25 stratified, as datasets."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    base = tmp_path_factory.mktemp("digits")
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    split = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    for name, (features, labels) in {"train": split[0::2], "test": split[1::2]}.items():
        np.savez(base / f"{name}.npz", X=features, y=labels.astype(np.int64))
        run = granger("import-dataset", base / f"{name}.npz", base / f"{name}.h5")
        assert run.returncode == 0, run.output
    return base, split


def test_scaled_digits_softmax_and_mlp_at_p4_match_scikit_learn(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    base, (X_train, X_test, y_train, y_test) = digits
    theirs = {
        "softmax": LogisticRegression(max_iter=1000).fit(X_train, y_train).score(X_test, y_test),
        "mlp": MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0)
        .fit(X_train, y_train).score(X_test, y_test),
    }
    ours = {}
    for kind, hidden, lr in (("softmax", [], 0.02), ("mlp", [64], 0.01)):
        job = write_job(base / f"{kind}.toml", dataset=base / "train.h5", run_dir=base / kind,
                        data={"test_path": str(base / "test.h5")},
                        model={"kind": kind, "hidden": hidden},
                        optimizer={"name": "adam", "learning_rate": lr, "momentum": 0.0,
                                   "schedule": "cosine"},
                        train={"global_batch": 64, "epochs": 60, "seed": 1})
        run = mpirun(4, "train", job, timeout=300)
        assert run.returncode == 0, run.output
        ours[kind] = float(run.stdout.split("test set")[1].split("accuracy")[1].split("%")[0]) / 100
    for kind in ours:
        print(f"digits, {kind}: granger-mpi at P=4 {100 * ours[kind]:.2f}%, "
              f"scikit-learn {100 * theirs[kind]:.2f}%")
    for kind in ours:
        assert ours[kind] >= theirs[kind] - 0.01, (kind, ours, theirs)
