"""The alpha-beta-gamma cost model of an allreduce (docs/architecture.md, "The cost model").

``alpha``: seconds per message, ``beta``: per byte sent, ``gamma``: per byte added. ``auto``
uses it where its calibration has no table; ``tools.scaling`` fits it to benchmarks and
projects step times with it.
"""

import math

import numpy as np

from granger_mpi.collectives.buffers import largest_power_of_two


def coefficients(algorithm: str, nbytes: int, size: int) -> np.ndarray:
    """The multipliers of (alpha, beta, gamma) in the seconds of one allreduce of ``nbytes``
    over ``size`` ranks."""
    p2 = largest_power_of_two(size)
    fold = np.array([2.0, 2.0 * nbytes, nbytes]) if p2 != size else np.zeros(3)   # extra ranks folded in
    steps = math.log2(p2)
    if algorithm == "ring":
        return np.array([2 * (size - 1), 2 * (size - 1) / size * nbytes, (size - 1) / size * nbytes])
    if algorithm == "rhd":
        return np.array([2 * steps, 2 * (p2 - 1) / p2 * nbytes, (p2 - 1) / p2 * nbytes]) + fold
    if algorithm == "rd":
        return np.array([steps, steps * nbytes, steps * nbytes]) + fold
    if algorithm == "native":
        # MPI_Allreduce in C: recursive doubling without Python's cost per message
        return np.array([steps / 4, steps * nbytes, steps * nbytes]) + fold
    if algorithm == "shm":
        # three barriers; copy in, add our segment from every slot, copy the rest out
        return np.array([3.0, 0.0, 3.0 * nbytes])
    if algorithm == "hierarchical":   # one node: binomial reduce then broadcast
        return math.ceil(math.log2(size)) * np.array([2.0, 2.0 * nbytes, nbytes])
    raise ValueError(f"no model for algorithm {algorithm!r}")


def seconds(algorithm: str, nbytes: int, size: int, model: dict) -> float:
    """Predicted seconds of one allreduce by ``model`` (``alpha``, ``beta``, ``gamma``)."""
    return float(coefficients(algorithm, nbytes, size) @ [model["alpha"], model["beta"], model["gamma"]])
