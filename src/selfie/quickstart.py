"""`selfie quickstart`: the whole story on the built-in digits, offline, with no set-up.

Pretrain on all training digits without labels, then finetune with LABELS_PER_CLASS labels
per class from the pretrained weights and from scratch, SEEDS seeds each, print the table and
say what it shows, computed from the table. The settings were chosen on validation digits
(benchmarks/quickstart_settings.py; README, "How the quickstart was set").
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from selfie.config import Config, get_preset
from selfie.experiment import Plan, Runtime, run_experiment
from selfie.report import Cell, table_markdown
from selfie.runfolder import RunFolder

LABELS_PER_CLASS = 5
SEEDS = 5


def conclusion(cell: Cell, labels_per_class: int) -> str:
    """What the table allows one to say, and what it does not."""
    n = min(len(cell.scratch), len(cell.pretrained))
    p, diff = cell.p_value, cell.difference
    p_text = "n/a" if math.isnan(p) else f"{p:.3f}"
    if diff > 0 and p < 0.05:
        found = (
            f"With {labels_per_class} labels per class, the network pretrained on the unlabelled "
            f"digits was {diff:.1f} points more accurate than the same network trained from "
            f"scratch, beyond the spread across seeds (Welch p = {p_text}, {n} seeds each): "
            "pretraining without labels helped when labels were few."
        )
    else:
        found = (
            f"With {labels_per_class} labels per class the difference ({diff:+.1f} points, "
            f"Welch p = {p_text}, {n} seeds each) is within the spread across seeds: this run "
            "does not show that pretraining helped."
        )
    return (
        f"What this shows: {found}\n"
        "What it does not: the p-value counts finetuning seeds of one pretraining run, and "
        "pretraining runs differ (on validation digits, four runs with three seeds and two "
        "CPU kinds' float rounding gained +1.7 to +5.5 points, one of them within the seed "
        "spread), so this is one draw, not a measure of the method; nor does it say how much "
        "Selfie gives on your images, with more labels, or against a baseline trained to "
        "convergence. For CIFAR-10 with the paper's protocol see RESULTS.md."
    )


def quickstart(out: Path, bf16: bool = False, config: Config | None = None) -> None:
    """Run and print the quickstart in `out`; `config` (default: the digits preset) lets the
    tests run it on the tiny preset."""
    config = config or get_preset("digits")
    p, d = config.pretrain, config.data
    masked = d.num_patches - p.num_visible(d.num_patches)
    print(
        "Selfie quickstart on scikit-learn's handwritten digits (offline, about 3 minutes).\n"
        f"1. Pretrain a ResNet-10 v2 without labels: {p.steps} steps of {p.batch_size} images. "
        f"Each image is cut into {d.num_patches} patches; {masked} are hidden and the model "
        "must pick which hidden patch belongs at each hidden location.\n"
        f"2. Finetune with {LABELS_PER_CLASS} labels per class for {config.finetune.steps} "
        f"steps, from the pretrained weights and from scratch, {SEEDS} seeds each; test "
        "accuracy on the 360 held-out digits.\n",
        flush=True,
    )
    plan = Plan(labels=(LABELS_PER_CLASS,), seeds=SEEDS)
    progress = sys.stderr.isatty()
    cells = run_experiment(config, plan, out, Runtime(bf16=bf16, progress=progress))

    pre = out / "pretrain"
    summary = json.loads((pre / "summary.json").read_text())
    records = RunFolder(pre, resume=True).metrics()
    print(f"\nPretraining: pretext accuracy (chance {summary['chance_pretext_acc']:.2f})")
    print(f"{'step':>6}  {'loss':>6}  {'pretext acc':>11}")
    shown = records[:: max(1, len(records) // 6)]
    shown += [] if shown[-1] is records[-1] else records[-1:]
    for r in shown:
        print(f"{r['step']:>6}  {r['loss']:>6.3f}  {r['pretext_acc']:>11.3f}")
    print(f"held-out digits: {summary['heldout_pretext_acc']:.3f}; curve: {pre / 'pretext.png'}\n")
    print("Finetuning: test accuracy (%), mean ± std over seeds")
    print(table_markdown(cells))
    print(conclusion(cells[0], LABELS_PER_CLASS))
    print(f"\nFigure: {out / 'figure.png'}\nEverything: {out}")
