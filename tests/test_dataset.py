"""Datasets: parallel synthetic writes, imports, checks on open, streaming reads."""

import h5py
import numpy as np
import pytest

from conftest import granger, mpirun
from granger_mpi.data import dataset, integrity, partition
from granger_mpi.errors import UserError


def read_all(path):
    with h5py.File(path, "r") as f:
        return f["X"][...], f["y"][...], dict(f.attrs)


def test_parallel_write_is_bitwise_independent_of_rank_count(tmp_path):
    """Rows come from (seed, row block), so 1 and 3 writers make the same bytes."""
    paths = {}
    for n in (1, 3):
        paths[n] = tmp_path / f"p{n}.h5"
        # 20,000 rows x 64 features: 4 row blocks, so 3 ranks write 2, 1 and 1 blocks.
        run = mpirun(n, "make-dataset", paths[n], "--rows", "20000", "--features", "64",
                     "--classes", "5", "--seed", "9", timeout=120)
        assert run.returncode == 0, run.output
    X1, y1, attrs = read_all(paths[1])
    X3, y3, _ = read_all(paths[3])
    assert X1.dtype == np.float32 and X1.shape == (20000, 64) and y1.dtype == np.int32
    assert np.array_equal(X1.view(np.uint32), X3.view(np.uint32)) and np.array_equal(y1, y3)
    assert attrs["task"] == "classification" and attrs["n_classes"] == 5 and attrs["n_rows"] == 20000
    assert set(np.unique(y1)) == set(range(5))
    with h5py.File(paths[3], "r") as f:
        assert f["X"].chunks[0] * 64 * 4 <= dataset.CHUNK_BYTES
    assert not list(tmp_path.glob("*.tmp"))


def test_regression_dataset_and_its_test_split(tmp_path):
    path = tmp_path / "reg.h5"
    run = granger("make-dataset", path, "--task", "regression", "--targets", "2", "--rows", "300",
                  "--features", "4", "--test-rows", "50")
    assert run.returncode == 0, run.output
    info = dataset.open_info(path)
    assert (info.task, info.n_targets, info.n_rows, info.n_features) == ("regression", 2, 300, 4)
    test = dataset.open_info(tmp_path / "reg-test.h5")
    assert test.n_rows == 50
    X, _, _ = read_all(path)
    Xt, _, _ = read_all(tmp_path / "reg-test.h5")
    assert not np.array_equal(X[:50], Xt)  # the test split is drawn from its own stream


def make_file(path, X=None, y=None, **attrs):
    with h5py.File(path, "w") as f:
        if X is not None:
            f["X"] = X
        if y is not None:
            f["y"] = y
        f.attrs.update(attrs)
    return path


@pytest.mark.parametrize("X,y,message", [
    (None, np.zeros(4, np.int32), "has no /X dataset"),
    (np.zeros((4, 2), np.float32), None, "has no /y dataset"),
    (np.zeros((4, 2), np.float32), np.zeros(3, np.int32), "/X has 4 rows but /y has 3"),
    (np.zeros(4, np.float32), np.zeros(4, np.int32), "/X must be a 2-D float array"),
    (np.zeros((4, 2), np.float32), np.zeros(4, np.int32), "at least 2 classes"),
])
def test_open_rejects_malformed_files(tmp_path, X, y, message):
    path = make_file(tmp_path / "bad.h5", X, y)
    with pytest.raises(UserError, match=message):
        dataset.open_info(path)


def test_open_rejects_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        dataset.open_info(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        dataset.open_info(tmp_path / "text.h5")


def test_import_npz_npy_and_csv_agree(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 3))
    y = rng.integers(0, 4, 100)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    with open(tmp_path / "d.csv", "w") as fh:
        fh.write("a,b,c,label\n")
        for row, label in zip(X, y):
            fh.write(",".join(repr(float(v)) for v in row) + f",{label}\n")
    runs = [granger("import-dataset", tmp_path / "d.npz", tmp_path / "a.h5"),
            granger("import-dataset", tmp_path / "X.npy", tmp_path / "b.h5", "--labels", tmp_path / "y.npy"),
            granger("import-dataset", tmp_path / "d.csv", tmp_path / "c.h5")]
    for run in runs:
        assert run.returncode == 0, run.output
    for name in "abc":
        Xi, yi, attrs = read_all(tmp_path / f"{name}.h5")
        assert np.array_equal(Xi, X.astype(np.float32)) and np.array_equal(yi, y)
        assert attrs["task"] == "classification" and attrs["n_classes"] == y.max() + 1


def test_import_rejects_nan_with_row_number_and_leaves_no_file(tmp_path):
    X = np.ones((10, 2))
    X[6, 1] = np.nan
    np.savez(tmp_path / "d.npz", X=X, y=np.zeros(10))
    run = granger("import-dataset", tmp_path / "d.npz", tmp_path / "out.h5")
    assert run.returncode == 2, run.output
    assert "row 6 has NaN/Inf" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.tmp").exists()


def test_import_rejects_unknown_format_and_bad_csv(tmp_path):
    (tmp_path / "d.txt").write_text("1,2\n")
    run = granger("import-dataset", tmp_path / "d.txt", tmp_path / "o.h5")
    assert run.returncode == 2 and "unknown format '.txt'" in run.stderr
    (tmp_path / "d.csv").write_text("1,2,0\n3,x,1\n")
    run = granger("import-dataset", tmp_path / "d.csv", tmp_path / "o.h5")
    assert run.returncode == 2 and "line 2 is not 3 numeric fields" in run.stderr


@pytest.fixture
def small_windows(monkeypatch):
    """Windows (and checksum blocks) of a few rows, so small files stream in many windows."""
    monkeypatch.setattr(partition, "WINDOW_BYTES", 4 * 52)   # rows of 52 bytes


def checksummed_copy(source, path):
    """A copy of ``source`` with checksums at the current window size."""
    with h5py.File(source) as f, h5py.File(path, "w") as g:
        for name in ("X", "y"):
            g.create_dataset(name, data=f[name][...])
        g.attrs.update(f.attrs)
        integrity.add(g)
    return path


def stream_rows(info, world_size, budget, **kwargs):
    """Every (epoch, step, rank, rows, X, y) the ranks of ``world_size`` read, as one process."""
    out = []
    for rank in range(world_size):
        with dataset.BatchStream(info, 64, 4, world_size, rank, epochs=2,
                                 memory_budget_bytes=budget, **kwargs) as stream:
            assert stream.in_memory == (budget >= 1 << 20)
            out += [(epoch, step, rank, rows, X, y) for epoch, step, _, rows, X, y in stream]
    return out


@pytest.mark.parametrize("world_size", [1, 3])
def test_stream_in_memory_and_streamed_give_each_rank_the_same_rows(small_dataset, small_windows,
                                                                    tmp_path, world_size):
    """One order for both modes: the plan's rows, each row once per epoch, read from the
    rank's own region only; windows of 4 rows here, so the share streams in many."""
    info = dataset.open_info(checksummed_copy(small_dataset, tmp_path / "c.h5"))
    assert info.window == 4 and info.checksummed
    X_all, y_all, _ = read_all(small_dataset)
    held = stream_rows(info, world_size, 512 << 20)
    lanes = -(-64 // world_size)
    streamed = stream_rows(info, world_size, (2 * lanes * info.window + 2 * lanes + 16) * info.row_bytes)
    assert len(held) == len(streamed) == 2 * world_size * partition.steps_per_epoch(2000, 64)
    for (e, s, r, rows, X, y), (*where, rows2, X2, y2) in zip(held, streamed):
        assert (e, s, r) == tuple(where)
        assert np.array_equal(rows, partition.rank_rows(2000, 64, 4, e, s, world_size, r, window=4))
        lo, hi = partition.rank_region(2000, 64, world_size, r)
        assert rows.min() >= lo and rows.max() < hi
        assert np.array_equal(rows, rows2) and np.array_equal(X, X_all[rows]) and np.array_equal(X2, X)
        assert np.array_equal(y, y_all[rows]) and np.array_equal(y2, y)
    for epoch in (0, 1):
        rows = np.concatenate([item[3] for item in held if item[0] == epoch])
        assert np.array_equal(np.sort(rows), np.arange(info.n_rows))


def test_stream_resumed_mid_epoch_gives_the_same_rows(small_dataset, small_windows, tmp_path):
    info = dataset.open_info(checksummed_copy(small_dataset, tmp_path / "c.h5"))
    whole = stream_rows(info, 2, 100 * info.window * info.row_bytes)
    resumed = stream_rows(info, 2, 100 * info.window * info.row_bytes, start_step=37, max_steps=50)
    expected = [w for w in whole if 37 <= w[0] * 32 + w[1] < 50]
    assert [w[:3] for w in resumed] == [w[:3] for w in expected]
    assert all(np.array_equal(a[4], b[4]) for a, b in zip(resumed, expected))


@pytest.mark.parametrize("budget", [512 << 20, 336 * 52], ids=["in-memory", "streamed"])
def test_stream_names_the_damaged_rows_for_the_step_that_reads_them(small_dataset, small_windows,
                                                                   tmp_path, budget):
    path = checksummed_copy(small_dataset, tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["X"][1234, 5] += 1          # block 308 of 4 rows: rows [1232, 1236)
    info = dataset.open_info(path)
    with pytest.raises(integrity.DamagedData, match=r"/X rows \[1232, 1236\) do not match") as caught:
        with dataset.BatchStream(info, 64, 4, 2, 1, epochs=1, memory_budget_bytes=budget) as stream:
            for _ in stream:
                pass
    epoch, step, batch_len, rows = caught.value.step_item
    if budget < 1 << 20:   # streamed: the step that enters the damaged window
        assert any(1232 <= r < 1236 for r in rows)
    else:                  # in memory: the whole share is read (and checked) for the first step
        assert step == 0


def test_stream_memory_budget_counts_the_stored_dtype(small_dataset, tmp_path):
    info = dataset.open_info(small_dataset)
    assert info.row_bytes == 4 * 12 + 4
    wide = tmp_path / "f64.h5"
    X, y, attrs = read_all(small_dataset)
    with h5py.File(wide, "w") as f:
        f["X"], f["y"] = X.astype(np.float64), y.astype(np.int64)
        f.attrs.update(attrs)
    info64 = dataset.open_info(wide)
    assert info64.row_bytes == 8 * 12 + 8 and info64.window == info.window // 2
    budget = 1000 * info.row_bytes + 4 * 64 * info64.row_bytes   # a float32 half fits, not a float64 one
    with dataset.BatchStream(info, 64, 0, 2, 0, epochs=1, memory_budget_bytes=budget) as stream:
        assert stream.in_memory
        for (*_, X, y), _ in zip(stream, range(3)):
            assert X.dtype == np.float32 and y.dtype == np.int32
    with pytest.raises(UserError, match=r"share \(0.1 MiB\) does not fit"):
        dataset.BatchStream(info64, 64, 0, 2, 0, epochs=1, memory_budget_bytes=budget)


def test_stream_memory_budget_bounds_read_ahead(small_dataset):
    info = dataset.open_info(small_dataset)
    row = info.row_bytes
    with dataset.BatchStream(info, 100, 0, 1, 0, epochs=1, prefetch_steps=8,
                             memory_budget_bytes=2250 * row) as stream:
        assert stream.in_memory and stream.depth == 2     # the share, and two steps of 100 rows
        assert sum(1 for _ in stream) == 20
    with pytest.raises(UserError, match="over \\[data\\].memory_budget_mb"):
        dataset.BatchStream(info, 100, 0, 1, 0, epochs=1, memory_budget_bytes=50 * row)
    with pytest.raises(UserError, match="streaming it takes two windows of 20 rows"):
        dataset.BatchStream(info, 100, 0, 1, 0, epochs=1, memory_budget_bytes=1000 * row)


def test_stream_stops_at_max_steps_and_can_be_abandoned(small_dataset):
    info = dataset.open_info(small_dataset)
    with dataset.BatchStream(info, 64, 0, 2, 0, epochs=5, max_steps=7) as stream:
        assert sum(1 for _ in stream) == 7
    stream = dataset.BatchStream(info, 64, 0, 2, 0, epochs=5)
    next(iter(stream))
    stream.close()
    assert not stream._thread.is_alive()


@pytest.mark.parametrize("label", [2**31, 2**32 + 1, -1, 2**53 + 1], ids=str)
def test_import_refuses_a_label_int32_cannot_hold_and_names_the_row(tmp_path, label):
    y = np.arange(10, dtype=np.int64) % 2
    y[7] = label
    np.savez(tmp_path / "d.npz", X=np.ones((10, 2)), y=y)
    run = granger("import-dataset", tmp_path / "d.npz", tmp_path / "out.h5", "--task", "classification")
    assert run.returncode == 2, run.output
    assert f"row 7 has NaN/Inf or an invalid label (label {label})" in run.stderr, run.output
    assert not (tmp_path / "out.h5").exists()


def test_import_keeps_int64_labels_below_the_limit(tmp_path):
    y = (np.arange(10, dtype=np.int64) % 2) * 9
    np.savez(tmp_path / "d.npz", X=np.ones((10, 2)), y=y)
    run = granger("import-dataset", tmp_path / "d.npz", tmp_path / "out.h5")
    assert run.returncode == 0, run.output
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert np.array_equal(f["y"][...], y) and f.attrs["n_classes"] == 10
