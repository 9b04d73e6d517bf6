"""CRC32 of slabs combined into the CRC of the whole, against zlib over the whole bytes."""

import os
import zlib

import numpy as np

from granger_mpi.storage import checksums


def test_crc32_combine_matches_zlib_of_the_concatenation():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a, b = os.urandom(int(rng.integers(0, 400))), os.urandom(int(rng.integers(0, 400)))
        assert checksums.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
        assert checksums.crc32_combine(0, zlib.crc32(b), len(b)) == zlib.crc32(b)   # A empty


def test_combining_with_a_crc_of_zero_is_the_general_formula():
    """``crc32_combine`` skips the polynomial product when CRC(A) is 0 (A empty, or any A
    whose CRC happens to be 0): the product is 0 then."""
    rng = np.random.default_rng(2)
    for _ in range(100):
        crc2, len2 = int(rng.integers(0, 2**32)), int(rng.integers(0, 2**40))
        assert checksums._multmodp(checksums._shift(len2), 0) ^ crc2 == crc2
        assert checksums.crc32_combine(0, crc2, len2) == crc2


def test_slabs_of_uneven_ranks_combine_to_the_whole_tensor():
    tensor = np.random.default_rng(1).random((1001, 37)).astype(np.float32)
    whole = zlib.crc32(tensor.view(np.uint8))
    for ranks in (1, 2, 3, 7, 64):
        slabs = np.array_split(tensor, ranks)     # some empty when ranks > rows would be
        assert checksums.combine([checksums.crc32(s) for s in slabs],
                                 [s.nbytes for s in slabs]) == whole


def test_pipeline_chains_chunks_per_stream_in_a_helper_thread(monkeypatch):
    monkeypatch.setattr(checksums, "CHUNK_BYTES", 1 << 20)
    data = [np.random.default_rng(i).random(3_000_000).astype(np.float32) for i in range(2)]
    pipeline = checksums.CrcPipeline(2, checksums.THREAD_BYTES)
    assert pipeline._thread is not None
    ranges = checksums.chunks(data[0].size, data[0].itemsize)
    assert len(ranges) == 12 and ranges[-1][1] == data[0].size
    for lo, hi in ranges:
        for i in (0, 1):
            pipeline.feed(i, data[i][lo:hi])
    assert pipeline.results() == [zlib.crc32(d.view(np.uint8)) for d in data]


def test_small_totals_are_checksummed_inline_with_the_same_result():
    data = np.arange(1000, dtype=np.float32)
    pipeline = checksums.CrcPipeline(1, data.nbytes)
    assert pipeline._thread is None
    for lo, hi in ((0, 10), (10, 999), (999, 1000)):
        pipeline.feed(0, data[lo:hi])
    assert pipeline.results() == [zlib.crc32(data.view(np.uint8))]
