"""Ring allreduce with bfloat16 on the wire: half the bytes, sums kept in float32.

Reduce-scatter: at each hop a rank sends its float32 partial sum of one segment rounded to
bf16, and adds the bf16 partial sum it receives into its own float32 values, so every
addition is a float32 one. The owner of a finished segment rounds it to bf16 once, keeps
the rounded values (as float32) and passes exactly those bits around the allgather; so
every rank, the owner too, ends holding the same values, bitwise, and the order of the
additions is the ring's, fixed by rank. The error against a float32 sum is the bf16
rounding of ``P - 1`` partial sums and of the result: a relative ``2**-9`` each.
"""

import numpy as np

from granger_mpi.kernels import bf16
from granger_mpi.collectives.buffers import TAG_RING, cache, exchanged, segment_offsets

COMPRESSIONS = ("none", "bf16")


def _wire(comm, length):
    """Two reusable uint16 arrays on ``comm``: the whole buffer's bf16, and a receive piece."""
    store = cache(comm)
    found = store.get("bf16")
    if found is None or found[0].size < length:
        found = (np.empty(length, np.uint16), np.empty(length, np.uint16))
        store["bf16"] = found
    return found


def allreduce(comm, buf):
    """Sum float32 ``buf`` over ``comm`` in place, with bf16 on the wire (collective)."""
    if buf.dtype != np.float32:
        raise ValueError(f"bf16 compression reduces float32 buffers, got {buf.dtype}")
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1 or buf.size == 0:
        return buf
    off = segment_offsets(buf.size, size)
    right, left = (rank + 1) % size, (rank - 1) % size
    wire, incoming = _wire(comm, buf.size)
    for step in range(size - 1):        # reduce-scatter, as ring.reduce_scatter
        send, recv = (rank - step - 1) % size, (rank - step - 2) % size
        s_lo, s_hi, r_lo, r_hi = off[send], off[send + 1], off[recv], off[recv + 1]
        bf16.encode(buf[s_lo:s_hi], wire[s_lo:s_hi])
        comm.Sendrecv(wire[s_lo:s_hi], right, TAG_RING, incoming[:r_hi - r_lo], left, TAG_RING)
        bf16.add_decoded(incoming[:r_hi - r_lo], buf[r_lo:r_hi])
        exchanged()
    bf16.encode(buf[off[rank]:off[rank + 1]], wire[off[rank]:off[rank + 1]])
    for step in range(size - 1):        # allgather of the rounded segments
        send, recv = (rank - step) % size, (rank - step - 1) % size
        comm.Sendrecv(wire[off[send]:off[send + 1]], right, TAG_RING,
                      wire[off[recv]:off[recv + 1]], left, TAG_RING)
        exchanged()
    bf16.decode(wire[:buf.size], buf)
    return buf
