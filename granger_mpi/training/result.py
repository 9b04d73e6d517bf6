"""What a finished run reports, from either strategy (synchronous or parameter server)."""

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainResult:
    """What a finished run reports (the same on every rank but ``seconds``)."""

    steps: int
    final_loss: float
    final_accuracy: float | None
    model_path: Path
    metrics_path: Path
    test_loss: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0             # the training loop and its final checkpoint
    samples: int = 0                 # rows in the global batches of the steps trained
    stopped: bool = False            # stopped on request after a checkpoint, or past the limits
    checkpoint: Path | None = None   # the last checkpoint written
    world_size: int = 0              # at the end
    ranks_lost: int = 0
    limit_reason: str | None = None  # stopped because ranks died past the [fault] limits
