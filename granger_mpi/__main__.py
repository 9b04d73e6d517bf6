"""``python -m granger_mpi`` runs the command line."""

import sys

from granger_mpi.cli import main

sys.exit(main())
