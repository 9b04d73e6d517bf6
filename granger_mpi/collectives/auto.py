"""``auto``: choose the allreduce algorithm per call from message size and world size.

Two sources, in order:

1. A calibration table (``granger-mpi bench calibrate``): every algorithm timed at sizes
   4 B .. 64 MiB at this world size; ``auto`` takes the fastest at the nearest measured
   size. Tables are kept per (world size, all ranks on one node), in the JSON file named by
   ``GRANGER_CALIBRATION`` (default ``~/.cache/granger-mpi/calibration.json``); where that
   has no table, the one shipped with granger-mpi (measured on the project's 2-core
   machines) is used.
2. Otherwise the alpha-beta-gamma model (``costmodel``) with the file's (or default) alpha
   (seconds per message), beta (seconds per byte sent) and gamma (seconds per byte added),
   except that large messages across nodes on more than 2 ranks go by ring
   (``RING_ACROSS_NODES_BYTES``).

Rank 0 reads the file and broadcasts it, so every rank decides alike (a disagreement would
hang). Each decision is logged once per size on rank 0 (logger ``granger_mpi.collectives``).
"""

import json
import logging
import math
import os
from pathlib import Path

from granger_mpi.collectives import shm
from granger_mpi.collectives.buffers import cache
from granger_mpi.collectives.costmodel import seconds as model_seconds
from granger_mpi.errors import UserError
from granger_mpi.mpi.runtime import bcast_text

log = logging.getLogger("granger_mpi.collectives")
SHIPPED = Path(__file__).with_name("calibration.json")
# Defaults measured on the project's 2-core machine (shared memory, Python per message).
DEFAULT_MODEL = {"alpha": 12e-6, "beta": 1 / 6.5e9, "gamma": 1 / 25e9}
CANDIDATES = ("native", "ring", "rhd", "rd", "shm", "hierarchical")
# Across nodes, with no table, messages of at least this size go by ring on more than 2
# ranks: each ring connection carries data one way, while a pairwise exchange (rhd, rd,
# native) sends both ways on one connection, where each message's rendezvous waits behind
# the partner's data. The alpha-beta-gamma model cannot see that; the measurement is in
# docs/performance.md ("Segments: what the link wants").
RING_ACROSS_NODES_BYTES = 256 << 10


def calibration_path():
    """Where calibrations are read from and written to."""
    env = os.environ.get("GRANGER_CALIBRATION")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "granger-mpi" / "calibration.json"


def read_calibration(path):
    """The calibration document at ``path``, or an empty one."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def table_key(size, one_node):
    """Key of a table: world size and whether all ranks share one node."""
    return f"P{size}-{'node' if one_node else 'net'}"


def _malformed(path):
    """What is wrong with the calibration file at ``path`` (None if it is absent or sound)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    if not isinstance(doc, dict) or not isinstance(doc.get("tables", {}), dict):
        return "its 'tables' is not a table of tables"
    for key, table in doc.get("tables", {}).items():
        try:
            sizes = [float(b) for b in table["bytes"]]
            if not sizes or min(sizes) <= 0 or any(
                    len(times) != len(sizes) or not all(isinstance(t, (int, float)) for t in times)
                    for times in table["median_us"].values()):
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            return (f"table {key!r} is not 'bytes' (positive sizes) and 'median_us' (a list of "
                    f"times per size for each algorithm)")
    model = doc.get("model", DEFAULT_MODEL)
    if not isinstance(model, dict) or not all(isinstance(model.get(k), (int, float))
                                              for k in DEFAULT_MODEL):
        return f"its 'model' is not numbers for {', '.join(DEFAULT_MODEL)}"
    return None


def merged_document():
    """The user's calibration over the shipped one: their tables win, and their model."""
    mine, shipped = read_calibration(calibration_path()), read_calibration(SHIPPED)
    return {"model": mine.get("model", shipped.get("model", DEFAULT_MODEL)),
            "tables": {**shipped.get("tables", {}), **mine.get("tables", {})}}


def _document(comm):
    """The calibration document, read on rank 0 and broadcast (cached on ``comm``); a
    malformed user calibration is a ``UserError`` on every rank."""
    store = cache(comm)
    if "auto-doc" not in store:
        text = ""
        if comm.Get_rank() == 0:
            problem = _malformed(calibration_path())
            if problem:
                text = json.dumps({"error": f"calibration file {calibration_path()} is malformed: "
                                            f"{problem}; run 'granger-mpi bench calibrate' under "
                                            f"mpirun again, or delete it"})
            else:
                text = json.dumps(merged_document())
        doc = json.loads(bcast_text(comm, text, 0))
        if "error" in doc:
            raise UserError(doc["error"], agreed=True)
        store["auto-doc"] = doc
    return store["auto-doc"]


def decide(doc, nbytes, size, one_node, candidates=CANDIDATES):
    """``(algorithm, predicted us, source)`` for an allreduce of ``nbytes`` on ``size`` ranks
    by the calibration document ``doc``: the fastest at the nearest calibrated size, or by
    the alpha-beta-gamma model where ``doc`` has no table (pure; ``choose`` and the step
    model both decide with it)."""
    table = doc.get("tables", {}).get(table_key(size, one_node))
    allowed = [a for a in candidates if one_node or a != "shm"]
    if table:
        nearest = min(range(len(table["bytes"])),
                      key=lambda i: abs(math.log2(max(nbytes, 1)) - math.log2(table["bytes"][i])))
        times = {a: table["median_us"][a][nearest] for a in allowed if a in table["median_us"]}
        source = f"calibrated at {table['bytes'][nearest]} B"
    else:
        times = {a: model_seconds(a, nbytes, size, doc.get("model", DEFAULT_MODEL)) * 1e6 for a in allowed}
        source = "alpha-beta-gamma model"
        if not one_node and size > 2 and nbytes >= RING_ACROSS_NODES_BYTES and "ring" in times:
            return "ring", times["ring"], "ring for large messages across nodes, no calibration table"
    choice = min(times, key=times.get)
    return choice, times[choice], source


def choose(comm, nbytes, candidates=CANDIDATES):
    """Name of the algorithm for an allreduce of ``nbytes`` on ``comm`` (collective once).

    ``candidates`` narrows the choice (under ULFM: the algorithms without shared memory).
    """
    decisions = cache(comm).setdefault("auto-decisions", {})
    choice = decisions.get((nbytes, candidates))
    if choice is not None:
        return choice
    size = comm.Get_size()
    choice, predicted_us, source = decide(_document(comm), nbytes, size, shm.on_one_node(comm), candidates)
    decisions[(nbytes, candidates)] = choice
    if comm.Get_rank() == 0:
        log.info("allreduce auto: %d bytes on %d ranks -> %s (%s, predicted %.1f us)",
                 nbytes, size, choice, source, predicted_us)
    return choice
