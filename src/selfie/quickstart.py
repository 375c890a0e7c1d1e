"""`selfie quickstart`: the whole story on the built-in digits, offline, with no set-up.

Pretrain on all training digits without labels, then finetune with 5 labels per class from
the pretrained weights and from scratch, 3 seeds each, and print the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfie.config import get_preset
from selfie.experiment import Plan, Runtime, run_experiment
from selfie.report import table_markdown
from selfie.runfolder import RunFolder

LABELS_PER_CLASS = 5
SEEDS = 3


def quickstart(out: Path, bf16: bool = False) -> None:
    config = get_preset("digits")
    p, d = config.pretrain, config.data
    masked = d.num_patches - p.num_visible(d.num_patches)
    print(
        "Selfie quickstart on scikit-learn's handwritten digits (offline, about 3 minutes).\n"
        f"1. Pretrain a ResNet-10 v2 without labels: {p.steps} steps of {p.batch_size} images. "
        f"Each image is cut into {d.num_patches} patches; {masked} are hidden and the model "
        "must pick which hidden patch belongs at each hidden location.\n"
        f"2. Finetune with {LABELS_PER_CLASS} labels per class, from the pretrained weights "
        f"and from scratch, {SEEDS} seeds each; test accuracy on the held-out digits.\n",
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
    print(f"Figure: {out / 'figure.png'}\nEverything: {out}")
