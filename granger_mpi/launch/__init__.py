"""Starting jobs: ``mpirun`` with the flags a job's fault mode needs (``mpirun``), and the
supervisor that restarts a run from its newest checkpoint (``supervise``). Never imports
the training layer."""
