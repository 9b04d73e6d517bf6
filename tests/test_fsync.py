"""fsync.start: the outcome of an fsync run in the background."""

import errno

import pytest

from granger_mpi.storage import fsync


@pytest.mark.parametrize("data_only", [False, True])
def test_the_outcome_of_each_fsync_is_reported_once_it_ends(tmp_path, data_only):
    good = tmp_path / "good.bin"
    good.write_bytes(b"x" * (1 << 20))
    waits = [fsync.start(path, data_only) for path in (good, "/proc/self/stat", tmp_path / "none")]
    outcomes = [wait() for wait in waits]
    assert outcomes[0] is None
    # procfs files cannot be synced: the error comes from the fsync itself
    assert outcomes[1].errno == errno.EINVAL and "/proc/self/stat" in str(outcomes[1])
    assert outcomes[2].errno == errno.ENOENT
    assert [wait() for wait in waits] == outcomes       # asked again: the same answer
