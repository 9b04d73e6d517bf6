"""``granger_mpi.reporters.Reporter``: the base class of a user's own metrics sink, under the
name the README and job files give it (it lives in ``granger_mpi.observe.reporters``)."""

from granger_mpi.observe.reporters import Reporter

__all__ = ["Reporter"]
