"""How the quickstart's settings were chosen, without looking at its test digits: validation
accuracy of both arms (Selfie pretrained, scratch) on the built-in digits for a grid of
pretraining lengths, labels per class and finetuning lengths, 5 seeds each, with Welch's p
and the wall time of each setting. Prints figures; asserts nothing.

    python benchmarks/quickstart_settings.py --out runs/qs-settings \
        [--pretrain-steps 300,600] [--labels 3,5] [--finetune-steps 100,200] [--seeds 5]
        [--lrs 0.05] [--set KEY=VALUE ...]

Each finetuning run draws VAL_PER_CLASS + L labelled training digits per class and holds
out VAL_PER_CLASS of them (the tuning split of `finetune --validation`): it trains on L per
class and reports accuracy on 10 x VAL_PER_CLASS training digits it never trained on. The
pretraining saw those digits without labels, as it sees every training digit; the test
digits stay unread. Run folders go under --out; a second call reuses the finished ones (and
a pretraining run linked in as --out/pretrainN).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from selfie.config import apply_overrides, get_preset
from selfie.experiment import finished_summary
from selfie.finetune import FinetuneSpec, finetune
from selfie.pretrain import pretrain
from selfie.report import Cell
from selfie.runfolder import RunOptions

VAL_PER_CLASS = 35


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _timed(folder: Path, run, *args) -> tuple[dict, float]:
    """The run's summary and its wall time in seconds (that of the first call: a finished
    run is read back, with the time it recorded)."""
    done = finished_summary(folder)
    if done is not None:
        return done, json.loads((folder / "wall.json").read_text())["seconds"]
    t0 = time.perf_counter()
    summary = run(*args, RunOptions(out=folder, device="cpu", progress=False, force=True))
    seconds = time.perf_counter() - t0
    (folder / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return summary, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-steps", default="300,600")
    parser.add_argument("--labels", default="3,5", help="labelled training digits per class")
    parser.add_argument("--finetune-steps", default="100,200")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lrs", default="0.05", help="finetuning peak LRs, both arms")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the digits preset, e.g. --set data.image_size=16 --set data.patch_size=4",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = apply_overrides(get_preset("digits"), args.overrides)
    rows = []
    for p_steps in _ints(args.pretrain_steps):
        config = replace(base, pretrain=replace(base.pretrain, steps=p_steps))
        pre = args.out / f"pretrain{p_steps}"
        pre_summary, pre_seconds = _timed(pre, pretrain, config)
        for labels in _ints(args.labels):
            total = labels + VAL_PER_CLASS
            f = replace(config.finetune, val_fraction=VAL_PER_CLASS / total)
            spec = FinetuneSpec(total, validation=True)
            for f_steps, lr in itertools.product(_ints(args.finetune_steps), _floats(args.lrs)):
                accs: dict[str, list[float]] = {"pretrained": [], "scratch": []}
                seconds = 0.0
                for arm, init in (("pretrained", str(pre)), ("scratch", None)):
                    # The scratch arm does not depend on the pretraining: one set of runs.
                    root = args.out / (f"from-pretrain{p_steps}" if init else "scratch")
                    for seed in range(args.seeds):
                        c = replace(config, finetune=replace(f, steps=f_steps, seed=seed, lr=lr))
                        name = f"{labels}pc-{f_steps}steps" + ("" if lr == 0.05 else f"-lr{lr:g}")
                        folder = root / name / arm / f"seed{seed}"
                        s, t = _timed(folder, finetune, c, replace(spec, init=init))
                        assert s["train_images"] == 10 * labels, s["train_images"]
                        accs[arm].append(100 * s["val_acc"])
                        seconds += t
                cell = Cell("resnet50", f"{labels}pc", 0.0, accs["scratch"], accs["pretrained"])
                rows.append(
                    {
                        "pretrain_steps": p_steps,
                        "heldout_pretext_acc": pre_summary["heldout_pretext_acc"],
                        "labels_per_class": labels,
                        "finetune_steps": f_steps,
                        "lr": lr,
                        "scratch": f"{cell.scratch_mean:.1f} ± {cell.scratch_std:.1f}",
                        "pretrained": f"{cell.pretrained_mean:.1f} ± {cell.pretrained_std:.1f}",
                        "difference": round(cell.difference, 2),
                        "welch_p": round(cell.p_value, 4),
                        "pretrain_s": round(pre_seconds, 1),
                        "finetune_s_per_run": round(seconds / (2 * args.seeds), 1),
                        "quickstart_s": round(pre_seconds + seconds, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
