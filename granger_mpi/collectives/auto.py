"""``auto``: pick the algorithm per call (placeholder until calibrated)."""


def choose(comm, nbytes):
    """Name of the algorithm to use for ``nbytes`` on ``comm``."""
    return "rd" if nbytes < 65536 else "ring"
