"""What the check programs share: rank 0 prints every rank's failures and the tally.

Imported by programs that the tests launch under mpirun, each launch with its own timeout
(tests/test_compression.py, tests/test_overlap.py); this module starts nothing."""


def report(comm, failures):
    """Collective: rank 0 prints each failure line, then ``checked P=<size>: <n> failure(s)``."""
    everyone = comm.gather(failures, root=0)
    if comm.Get_rank() == 0:
        flat = [line for lines in everyone for line in lines]
        for line in flat:
            print(line)
        print(f"checked P={comm.Get_size()}: {len(flat)} failure(s)", flush=True)
