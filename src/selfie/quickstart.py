"""`selfie quickstart`: the main job on the built-in digits, offline, with no set-up."""

from __future__ import annotations

import sys
from pathlib import Path

from selfie.config import get_preset
from selfie.pretrain import pretrain
from selfie.runfolder import RunFolder, RunOptions


def quickstart(out: Path, bf16: bool = False) -> None:
    config = get_preset("digits")
    print(
        f"Selfie quickstart: pretraining a ResNet-10 v2 on scikit-learn's handwritten digits\n"
        f"without labels, {config.pretrain.steps} steps of {config.pretrain.batch_size} images. "
        f"Each image is cut into {config.data.num_patches} patches; "
        f"{config.pretrain.num_visible(config.data.num_patches)} are shown, and the model must "
        f"pick which of the hidden ones belongs at each hidden location.\n"
    )
    summary = pretrain(
        config, RunOptions(out=out / "pretrain", bf16=bf16, progress=sys.stderr.isatty())
    )
    records = RunFolder(out / "pretrain", resume=True).metrics()
    chance = summary["chance_pretext_acc"]
    print(f"{'step':>6}  {'loss':>7}  {'pretext acc':>11}")
    shown = records[:: max(1, len(records) // 8)]
    if shown[-1] is not records[-1]:
        shown.append(records[-1])
    for r in shown:
        print(f"{r['step']:>6}  {r['loss']:>7.3f}  {r['pretext_acc']:>11.3f}")
    print(
        f"\nPretext accuracy on {summary['heldout_images']} held-out digits: "
        f"{summary['heldout_pretext_acc']:.3f} (chance: {chance:.3f}).\n"
        f"Plot: {out / 'pretrain' / 'pretext.png'}\nRun folder: {out}"
    )
