"""`selfie experiment`: the paper's evaluation protocol (SPEC 5) as one resumable command.

Pretrain once on the whole training set without labels (or reuse given weights). For each
head, labelled amount and arm (pretrained, scratch): optionally choose the peak LR from the
preset's grid by validation accuracy on the 90/10 split of the subset; then train on the
whole subset once per seed and evaluate on the test split. Every run has its own folder;
running the command again skips finished runs and resumes interrupted ones.

Layout of the experiment folder:
    experiment.json                 the plan and the resolved config
    pretrain/                       the pretraining run (unless --pretrained)
    tune/<head>/<labels>/<arm>/lr<LR>/   tuning runs (validation accuracy only)
    runs/<head>/<labels>/<arm>/seed<S>/  final runs (test accuracy)
    tuning.jsonl, results.jsonl, table.md, table.csv, figure.png
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from selfie import report
from selfie.checkpoint import list_checkpoints
from selfie.config import Config, config_from_dict, validate
from selfie.data import refuse_data_dir
from selfie.data.subsets import amount_label
from selfie.errors import UserError
from selfie.finetune import FinetuneSpec, finetune
from selfie.pretrain import pretrain
from selfie.runfolder import RunOptions, write_json

log = logging.getLogger(__name__)
ARMS = ("pretrained", "scratch")


@dataclass(frozen=True)
class Plan:
    labels: tuple[float | int, ...]
    seeds: int
    heads: tuple[str, ...] = ("resnet50",)
    tune: bool = False
    pretrained: str | None = None  # reuse these weights instead of pretraining


@dataclass(frozen=True)
class Runtime:
    """How to run each job (shared by all runs of the experiment)."""

    data_dir: str | None = None
    device: str = "auto"
    bf16: bool = False
    download: bool = False
    progress: bool = True
    resume_hint: str | None = None  # the experiment's own command, quoted on interruption
    workers: int | None = None  # decoding processes of a streamed dataset


def _options(folder: Path, rt: Runtime) -> RunOptions:
    """Resume an interrupted run (one with a checkpoint); restart one that never saved."""
    started = (folder / "config.json").exists()
    resumable = started and bool(list_checkpoints(folder / "checkpoints"))
    return RunOptions(
        out=folder,
        data_dir=rt.data_dir,
        device=rt.device,
        bf16=rt.bf16,
        resume=resumable,
        force=started and not resumable,
        download=rt.download,
        progress=rt.progress,
        resume_hint=rt.resume_hint,
        workers=rt.workers,
    )


def finished_summary(folder: Path) -> dict[str, Any] | None:
    """The summary of the run in `folder` if it finished, else None."""
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_pretrain(config: Config, folder: Path, rt: Runtime) -> str:
    if finished_summary(folder) is None:
        opts = _options(folder, rt)
        pretrain(None if opts.resume else config, opts)
    return str(folder)


def run_finetune(config: Config, spec: FinetuneSpec, folder: Path, rt: Runtime) -> dict:
    done = finished_summary(folder)
    if done is not None:
        return done
    opts = _options(folder, rt)
    log.info("finetune %s", folder)
    return finetune(None if opts.resume else config, None if opts.resume else spec, opts)


def _with(config: Config, **finetune_changes: Any) -> Config:
    return replace(config, finetune=replace(config.finetune, **finetune_changes))


def _check_plan(out: Path, config: Config, plan: Plan) -> None:
    """An experiment folder belongs to one config: refuse to mix results of two."""
    path = out / "experiment.json"
    if path.exists():
        stored = config_from_dict(json.loads(path.read_text())["config"])
        if stored != config:
            raise UserError(
                f"{out} holds an experiment with other settings (preset '{stored.name}'); "
                "use the same preset and --set values, or another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"config": config.to_dict(), "plan": asdict(plan)})


def run_experiment(config: Config, plan: Plan, out: Path, rt: Runtime) -> list[report.Cell]:
    config = validate(config)
    refuse_data_dir(config.data.dataset, rt.data_dir)  # before the folder is written
    _check_plan(out, config, plan)
    init = plan.pretrained or run_pretrain(config, out / "pretrain", rt)
    tuning, results = [], []
    for head in plan.heads:
        for amount in plan.labels:
            label = amount_label(amount)
            for arm in ARMS:
                spec = FinetuneSpec(amount, head, init if arm == "pretrained" else None)
                lr = config.finetune.lr
                if plan.tune:
                    scores = []
                    for grid_lr in config.finetune.lr_grid:
                        folder = out / "tune" / head / label / arm / f"lr{grid_lr:g}"
                        s = run_finetune(
                            _with(config, lr=grid_lr), replace(spec, validation=True), folder, rt
                        )
                        scores.append((s["val_acc"], -grid_lr))
                        tuning.append(
                            {
                                "head": head,
                                "labels": label,
                                "arm": arm,
                                "lr": grid_lr,
                                "val_acc": s["val_acc"],
                            }
                        )
                        _write_lines(out / "tuning.jsonl", tuning)
                    # Best validation accuracy; a tie goes to the smaller LR.
                    lr = -max(scores)[1]
                for k in range(plan.seeds):
                    seed = config.finetune.seed + k
                    folder = out / "runs" / head / label / arm / f"seed{seed}"
                    s = run_finetune(_with(config, lr=lr, seed=seed), spec, folder, rt)
                    results.append(
                        {
                            "head": head,
                            "labels": label,
                            "fraction": s["fraction"],
                            "arm": arm,
                            "seed": seed,
                            "lr": lr,
                            "test_acc": s["test_acc"],
                            "run": str(folder.relative_to(out)),
                        }
                    )
                    # Rewritten after every run: partial results are readable at any time.
                    _write_lines(out / "results.jsonl", results)
    return report.write_report(out / "results.jsonl", out)


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
