"""The training layer: one object per concern, assembled by ``Trainer`` (docs/architecture.md).

``state`` (what a step changes, commit/restore), ``step`` (compute, exchange, apply),
``requests`` (signals, STOP file, timed saves, the checkpoint policy), ``recovery`` (rank
failures: ULFM or none), ``saving`` (checkpoints of the loop), ``outputs`` (what the writer
rank records and prints), ``setup`` (checks and resume before a run), ``evaluation``, and
``trainer`` (the loop). ``async_sgd`` is the parameter-server strategy beside it.
"""
