"""Figures people would rather look at than read. Matplotlib with the file-only Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def pretext_curve(
    records: Sequence[dict[str, Any]],
    chance: float,
    path: Path,
    class_chance: float | None = None,
) -> None:
    """Pretext top-1 accuracy and loss against step, with the chance level 1/M; beside them,
    where the records hold the kNN monitor's `knn_acc`, that accuracy against step with the
    chance level 1/K of the classes."""
    steps = [r["step"] for r in records]
    knn = [(r["step"], r["knn_acc"]) for r in records if "knn_acc" in r]
    panels = 3 if knn else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5))
    ax_acc, ax_loss = axes[0], axes[1]
    ax_acc.plot(steps, [r["pretext_acc"] for r in records], label="pretext top-1 (train)")
    ax_acc.axhline(chance, color="grey", linestyle="--", label=f"chance 1/M = {chance:.2f}")
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="Which patch goes here?")
    ax_acc.legend(loc="lower right")
    ax_loss.plot(steps, [r["loss"] for r in records], color="C1")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="Pretext loss")
    if knn:
        ax_knn = axes[2]
        ax_knn.plot(*zip(*knn, strict=True), color="C2", marker="o", label="kNN top-1, k=20")
        if class_chance is not None:
            ax_knn.axhline(
                class_chance, color="grey", linestyle="--", label=f"chance 1/K = {class_chance:.2f}"
            )
        ax_knn.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="Representation: kNN on P")
        ax_knn.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
