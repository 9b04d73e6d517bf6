"""The errors granger-mpi reports to users, and the exit codes scripts can rely on."""

EXIT_OK = 0
EXIT_FAILURE = 1      # an internal error, a failed check, a rank that crashed
EXIT_BAD_INPUT = 2    # bad job file, dataset, argument or run directory; nothing was written
EXIT_STOPPED = 3      # stopped on request (SIGTERM, STOP file) after writing a checkpoint
EXIT_GAVE_UP = 4      # supervise: the run kept failing and the restarts are used up
EXIT_RANKS_LOST = 5   # ranks died past the [fault] limits (or without ULFM); checkpoint kept
EXIT_HUNG = 6         # the watchdog found a step, checkpoint or recovery stuck, and aborted


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback.

    The message names the thing at fault (file, dataset, key, rank, step). ``agreed`` says
    that every rank of the job raises it together (so exiting cleanly cannot strand a rank
    in a collective); an error seen by one rank alone ends the whole job instead.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message, *, agreed=False):
        super().__init__(message)
        self.agreed = agreed


class WriteError(UserError):
    """An output could not be written (a full disk, permissions): exit code 1, one line."""

    exit_code = EXIT_FAILURE


def describe_io_error(exc):
    """The useful part of an OSError or of HDF5's long RuntimeError text."""
    import re
    found = re.search(r"error message = '([^']*)'", str(exc))
    if found:
        return found.group(1)
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
