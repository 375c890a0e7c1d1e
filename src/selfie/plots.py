"""Figures people would rather look at than read. Matplotlib with the file-only Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def pretext_curve(records: Sequence[dict[str, Any]], chance: float, path: Path) -> None:
    """Pretext top-1 accuracy and loss against step, with the chance level 1/M."""
    steps = [r["step"] for r in records]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_acc.plot(steps, [r["pretext_acc"] for r in records], label="pretext top-1 (train)")
    ax_acc.axhline(chance, color="grey", linestyle="--", label=f"chance 1/M = {chance:.2f}")
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="Which patch goes here?")
    ax_acc.legend(loc="lower right")
    ax_loss.plot(steps, [r["loss"] for r in records], color="C1")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="Pretext loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
