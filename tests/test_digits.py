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


def _train(base, name, kind, hidden, lr, **collectives):
    """Test accuracy (a fraction) of ``mpirun -n 4 granger-mpi train`` on the digits."""
    job = write_job(base / f"{name}.toml", dataset=base / "train.h5", run_dir=base / name,
                    data={"test_path": str(base / "test.h5")},
                    model={"kind": kind, "hidden": hidden},
                    optimizer={"name": "adam", "learning_rate": lr, "momentum": 0.0,
                               "schedule": "cosine"},
                    train={"global_batch": 64, "epochs": 60, "seed": 1}, collectives=collectives)
    run = mpirun(4, "train", job, timeout=300)
    assert run.returncode == 0, run.output
    return float(run.stdout.split("test set")[1].split("accuracy")[1].split("%")[0]) / 100


@pytest.fixture(scope="module")
def ours(digits):
    base = digits[0]
    return {"softmax": _train(base, "softmax", "softmax", [], 0.02),
            "mlp": _train(base, "mlp", "mlp", [64], 0.01)}


def test_scaled_digits_softmax_and_mlp_at_p4_match_scikit_learn(digits, ours):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    base, (X_train, X_test, y_train, y_test) = digits
    theirs = {
        "softmax": LogisticRegression(max_iter=1000).fit(X_train, y_train).score(X_test, y_test),
        "mlp": MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0)
        .fit(X_train, y_train).score(X_test, y_test),
    }
    for kind in ours:
        print(f"digits, {kind}: granger-mpi at P=4 {100 * ours[kind]:.2f}%, "
              f"scikit-learn {100 * theirs[kind]:.2f}%")
    for kind in ours:
        assert ours[kind] >= theirs[kind] - 0.01, (kind, ours, theirs)


def test_digits_mlp_with_bf16_on_the_wire_is_within_half_a_point_of_float32(digits, ours):
    """#26: the same MLP run with [collectives].compression = "bf16" (450 test rows, so half
    a point is 2 rows)."""
    packed = _train(digits[0], "mlp-bf16", "mlp", [64], 0.01, algorithm="ring", compression="bf16")
    print(f"digits, mlp at P=4: float32 {100 * ours['mlp']:.2f}%, bf16 {100 * packed:.2f}%")
    assert abs(packed - ours["mlp"]) <= 0.005, (packed, ours["mlp"])
