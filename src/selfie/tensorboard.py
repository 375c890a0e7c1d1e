"""`--tensorboard`: the scalars of metrics.jsonl, also written as TensorBoard events to the
run folder's `tb/` (the optional extra: pip install 'selfie[tensorboard]').

metrics.jsonl stays the record; this is a view of it. A resumed run writes its events with
purge_step at its first logged step, so TensorBoard hides the events the interrupted session
wrote past its checkpoint, as the run's metrics.jsonl drops those records.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from selfie.errors import UserError

EXTRA = "pip install 'selfie[tensorboard]'"


def check_available() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package: {EXTRA}") from None


class TensorBoardLog:
    """Scalars of each logged record, under their metrics.jsonl names, at their step."""

    def __init__(self, folder: Path) -> None:
        check_available()
        self.folder = folder
        self.writer: Any = None

    def write(self, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = int(record["step"])
        if self.writer is None:  # at the first record: purge what a killed session left
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=step)
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
