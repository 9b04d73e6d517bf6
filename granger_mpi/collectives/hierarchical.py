"""Hierarchical allreduce: reduce inside each node, allreduce among node leaders, broadcast.

Nodes come from ``comm.Split_type(COMM_TYPE_SHARED)`` (ranks that share memory), or, to
emulate several nodes on one machine, from blocks of ``ranks_per_node`` consecutive
ranks. Inside a node the ranks sum through shared memory (``shm``); the node leaders
(each node's first rank) sum with recursive halving-doubling, so only one rank per node
talks across the network; a binomial tree then broadcasts from each leader. Sums follow
fixed orders, so all ranks end bitwise identical.
"""

from mpi4py import MPI

from granger_mpi.collectives import rhd, shm
from granger_mpi.collectives.buffers import TAG_HIER, cache


def node_comms(comm, ranks_per_node=None):
    """``(node, leaders)`` sub-communicators of ``comm``, made once and cached on it.

    ``leaders`` is ``MPI.COMM_NULL`` on ranks that do not lead their node.
    """
    store = cache(comm)
    key = ("hierarchical", ranks_per_node)
    if key not in store:
        rank = comm.Get_rank()
        if ranks_per_node:
            node = comm.Split(rank // ranks_per_node, rank)
        else:
            node = comm.Split_type(MPI.COMM_TYPE_SHARED, rank)
        leaders = comm.Split(0 if node.Get_rank() == 0 else MPI.UNDEFINED, rank)
        store[key] = (node, leaders)
    return store[key]


def _broadcast_from_first(node, buf):
    rank, size = node.Get_rank(), node.Get_size()
    mask = 1
    while mask < size:
        mask <<= 1
    mask >>= 1
    while mask:
        if rank % (2 * mask) == 0 and rank + mask < size:
            node.Send(buf, rank + mask, TAG_HIER)
        elif rank % (2 * mask) == mask:
            node.Recv(buf, rank - mask, TAG_HIER)
        mask >>= 1


def allreduce(comm, buf, ranks_per_node=None):
    """Sum ``buf`` over ``comm`` in place, one node at a time."""
    node, leaders = node_comms(comm, ranks_per_node)
    if node.Get_size() > 1:
        shm.allreduce(node, buf)          # every rank of the node now holds the node's sum
    if node.Get_size() == comm.Get_size():
        return
    if leaders != MPI.COMM_NULL:
        rhd.allreduce(leaders, buf)
    if node.Get_size() > 1:
        _broadcast_from_first(node, buf)
