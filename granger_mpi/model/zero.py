"""Sharded optimizer state (ZeRO stage 1): each rank keeps the optimizer state of one slice.

The step's exchange buffer (gradient followed by the step's statistics) is
reduce-scattered instead of allreduced: rank ``r`` ends holding segment ``r`` of the sum.
It clips and updates the parameters of that segment with its shard of the optimizer
state, writes the new parameters into the segment, and an allgather hands every rank all
parameters and the summed statistics. Communication is that of a ring allreduce; the
optimizer's memory per rank is divided by P. Every operation has a fixed order, so the
same job at the same P gives bitwise identical parameters on every rank and every run.
"""

from granger_mpi import collectives
from granger_mpi.collectives.buffers import segment_offsets


def shard_bounds(n_params, n_exchange, rank, size):
    """``(lo, hi)`` of the parameters whose optimizer state rank ``rank`` keeps.

    The segments of ``collectives.reduce_scatter`` over the ``n_exchange`` elements of the
    exchange buffer, cut at ``n_params`` (the statistics after the gradient are no parameters).
    """
    off = segment_offsets(n_exchange, size)
    return min(off[rank], n_params), min(off[rank + 1], n_params)


def exchange_and_update(comm, opt, exchange, params, step):
    """Reduce-scatter ``exchange``, update this rank's shard of ``params``, allgather.

    Collective over ``comm``. ``exchange`` holds this rank's gradient in its first
    ``params.size`` elements, statistics after them; afterwards it holds the new
    parameters there and the summed statistics after them, on every rank, and ``params``
    is updated in place. Returns ``(global gradient norm, learning rate)``.
    """
    n = params.size
    lo, hi = collectives.reduce_scatter(comm, exchange)
    lo, hi = min(lo, n), min(hi, n)
    if (lo, hi) != opt.shard:
        raise RuntimeError(f"rank {comm.Get_rank()}: reduce-scatter segment {lo}:{hi} is not the "
                           f"optimizer's shard {opt.shard[0]}:{opt.shard[1]}")
    grad = exchange[lo:hi]
    norm = opt.clip(grad, comm)
    lr = opt.step(params[lo:hi], grad, step)
    exchange[lo:hi] = params[lo:hi]
    collectives.allgather(comm, exchange)
    params[:] = exchange[:n]
    return norm, lr
