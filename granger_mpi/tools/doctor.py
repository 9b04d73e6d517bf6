"""``granger-mpi doctor``: what is actually loaded, and whether it works.

Each check prints ``ok``, ``FAIL`` or ``note`` with one line of detail; a FAIL makes the
command exit 1. Under ``mpirun`` every rank runs the checks and rank 0 reports, with the
number of ranks on which each check failed.
"""

import os

import numpy as np
from mpi4py import MPI

from granger_mpi.mpi import ulfm
from granger_mpi.mpi.runtime import mpi_library_version


def loaded_libraries(*fragments):
    """Paths of shared libraries mapped into this process whose name contains a fragment."""
    found = {}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path)
                for fragment in fragments:
                    if name.startswith(fragment):
                        found.setdefault(fragment, set()).add(path)
    except OSError:
        pass
    return {k: sorted(v) for k, v in found.items()}


def _checks():
    """Yield ``(status, name, detail)``; status is 'ok', 'FAIL' or 'note'."""
    import mpi4py
    import granger_mpi
    yield "ok", "granger-mpi", f"{granger_mpi.__version__} ({os.path.dirname(granger_mpi.__file__)})"
    # Open MPI's library is libmpi.so.40; MPICH's libmpi.so.12, which Debian names libmpich.so.12.
    found = loaded_libraries("libmpi.so", "libmpich.so")
    libmpi = found.get("libmpi.so", []) + found.get("libmpich.so", []) or ["?"]
    version = mpi_library_version()
    yield (("ok" if len(libmpi) == 1 else "FAIL"), "MPI library",
           f"{version}; mpi4py {mpi4py.__version__}; loaded {', '.join(libmpi)}"
           + ("" if len(libmpi) == 1 else " (more than one libmpi in one process: mpi4py and "
              "h5py disagree; import mpi4py.MPI before h5py)"))
    world = MPI.COMM_WORLD
    yield "ok", "MPI world", f"{world.Get_size()} rank(s), thread level {MPI.Query_thread()}"
    try:
        import h5py
    except ImportError as exc:
        yield "FAIL", "h5py", f"not importable: {exc}"
    else:
        parallel = h5py.get_config().mpi
        detail = (f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}, "
                  f"{'parallel (mpio driver)' if parallel else 'NOT parallel'}; "
                  f"loaded {', '.join(loaded_libraries('libhdf5').get('libhdf5', ['?']))}")
        yield ("ok" if parallel else "FAIL"), "HDF5", detail
    try:
        import numba
        layer = _numba_threading_layer()
    except Exception as exc:
        yield "FAIL", "numba", f"{type(exc).__name__}: {exc}"
    else:
        yield "ok", "numba", (f"numba {numba.__version__}, threading layer {layer}, "
                              f"{numba.get_num_threads()} thread(s) per rank")
    ulfm_on, detail = ulfm.probe()
    yield ("ok" if ulfm_on else "note"), "ULFM fault tolerance", (
        detail if ulfm_on else f"not available ({detail}); failures will be handled by restart")
    buf = np.full(4, world.Get_rank() + 1, np.float64)
    world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    expected = world.Get_size() * (world.Get_size() + 1) / 2
    yield ("ok" if np.all(buf == expected) else "FAIL"), "Allreduce", f"sum over ranks {buf[0]:g}, expected {expected:g}"


def _numba_threading_layer():
    import numba
    from granger_mpi.kernels import parallel
    parallel.touch(np.zeros(4))
    return numba.threading_layer()


def run(comm, require_ulfm=False, out=print):
    """Run the checks on every rank of ``comm``; rank 0 prints. Returns the exit code."""
    results = list(_checks())
    failed = np.array([status == "FAIL" or (require_ulfm and name.startswith("ULFM") and status != "ok")
                       for status, name, _ in results], np.int32)
    comm.Allreduce(MPI.IN_PLACE, failed, op=MPI.SUM)
    if comm.Get_rank() == 0:
        for (status, name, detail), n_failed in zip(results, failed):
            if n_failed and status != "FAIL":
                status = "FAIL"
            where = f" [failed on {n_failed} of {comm.Get_size()} ranks]" if n_failed and comm.Get_size() > 1 else ""
            out(f"{status:<4}  {name}: {detail}{where}")
        out("doctor: all checks passed" if not failed.any() else
            f"doctor: {int((failed > 0).sum())} check(s) failed")
    return 1 if failed.any() else 0
