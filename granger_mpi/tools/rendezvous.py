"""Where a peer framework's TCP rendezvous (PyTorch gloo) listens, for the comparisons.

Rank 0 listens; every rank must reach it. ``MASTER_ADDR`` if set; else, on one network
namespace, the loopback; across hosts, an address of rank 0's host: that of the interface
MPI's TCP transport was told to use (``btl_tcp_if_include``), else rank 0's first address
that is not a loopback.
"""

import fcntl
import os
import socket
import struct

import numpy as np
from mpi4py import MPI

from granger_mpi.mpi.runtime import bcast_text

SIOCGIFADDR = 0x8915


def interface_addresses():
    """``{interface: IPv4 address}`` of this process's network namespace."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:      # no IPv4 address on it
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def network_namespace():
    """Equal on processes that share a network: the kernel's boot id and the namespace."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return socket.gethostname()


def own_interface():
    """``(interface, address)`` others reach this host on: the interface MPI's TCP transport
    was told to use (``btl_tcp_if_include``), else the first that is not a loopback;
    ``(None, "127.0.0.1")`` if there is none."""
    addresses = interface_addresses()
    for name in os.environ.get("OMPI_MCA_btl_tcp_if_include", "").split(","):
        if name in addresses:
            return name, addresses[name]
    outside = [(n, a) for n, a in addresses.items() if not a.startswith("127.")]
    return outside[0] if outside else (None, "127.0.0.1")


def own_address():
    """This host's address for others to reach (see the module's doc)."""
    return os.environ.get("MASTER_ADDR") or own_interface()[1]


def use_interface_for_gloo(rendezvous_host):
    """Across hosts, bind gloo's connections to ``own_interface`` (unless
    ``GLOO_SOCKET_IFNAME`` says otherwise): by default gloo binds to what the hostname
    resolves to, which on emulated hosts is the loopback, and the other hosts are refused."""
    name = own_interface()[0]
    if not rendezvous_host.startswith("127.") and name and not os.environ.get("GLOO_SOCKET_IFNAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = name


def address(comm):
    """Collective: ``host:port`` that rank 0 has reserved, the same on every rank."""
    mine = network_namespace()
    same = np.array([1 if bcast_text(comm, mine, 0) == mine else 0], np.int32)
    comm.Allreduce(MPI.IN_PLACE, same, op=MPI.MIN)
    text = ""
    if comm.Get_rank() == 0:
        host = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if same[0] else own_address())
        with socket.socket() as s:
            s.bind(("" if host != "127.0.0.1" else host, 0))
            text = f"{host}:{s.getsockname()[1]}"
    return bcast_text(comm, text, 0)

