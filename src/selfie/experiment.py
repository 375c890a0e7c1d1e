"""`selfie experiment`: the paper's evaluation protocol (SPEC 5) as one resumable command.

Pretrain once on the whole training set without labels (or on --unlabelled-dir's images, or
reuse given weights; with --tune-visible once per visible fraction p). For each head,
labelled amount (or subset file) and arm (pretrained, scratch): optionally choose the peak LR
from the preset's grid, and for the pretrained arm the p, by validation accuracy on the 90/10
split of the subset; then train on the whole subset once per seed and evaluate on the test
split. Every run has its own folder;
running the command again skips finished runs and resumes interrupted ones.

Layout of the experiment folder:
    experiment.json                 the plan and the resolved config
    pretrain/                       the pretraining run (unless --pretrained)
    pretrain/p<P>/                  with --tune-visible: one pretraining per visible fraction
    tune/<head>/<labels>/<arm>/lr<LR>/   tuning runs (validation accuracy only)
    tune/<head>/<labels>/pretrained/p<P>/lr<LR>/   with --tune-visible
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
from selfie.data.source import train_names
from selfie.data.subsets import amount_label, read_subset_file, subset_label
from selfie.errors import UserError
from selfie.finetune import FinetuneSpec, finetune
from selfie.pretrain import pretrain
from selfie.runfolder import RunOptions, write_json

log = logging.getLogger(__name__)
ARMS = ("pretrained", "scratch")
Weights = tuple[float | None, str | None]  # (visible fraction if tuned, init; None: scratch)


@dataclass(frozen=True)
class Plan:
    labels: tuple[float | int, ...]
    seeds: int
    heads: tuple[str, ...] = ("resnet50",)
    tune: bool = False
    pretrained: str | None = None  # reuse these weights instead of pretraining
    subset_files: tuple[str, ...] = ()  # further cells: the labelled images each file names
    tune_visible: tuple[float, ...] = ()  # p values: one pretraining each, chosen per cell
    unlabelled_dir: str | None = None  # pretrain on these images, apart from the labelled ones


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
    compile: bool = False  # torch.compile each run's training model


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
        compile=rt.compile,
    )


def finished_summary(folder: Path) -> dict[str, Any] | None:
    """The summary of the run in `folder` if it finished, else None."""
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_pretrain(config: Config, folder: Path, rt: Runtime, unlabelled: str | None = None) -> str:
    if finished_summary(folder) is None:
        opts = replace(_options(folder, rt), unlabelled_dir=unlabelled)
        pretrain(None if opts.resume else config, opts)
    return str(folder)


def unlabelled_images(init: str) -> int | None:
    """The images the weights at `init` (a pretraining run folder, its model.safetensors or a
    checkpoint in it) were pretrained on, from the run's summary.json; None if not found."""
    path = Path(init)
    for folder in (path, path.parent, path.parent.parent):
        summary = finished_summary(folder) if folder.is_dir() else None
        if summary is not None and summary.get("kind") == "pretrain":
            return int(summary["train_images"])
    return None


def run_finetune(config: Config, spec: FinetuneSpec, folder: Path, rt: Runtime) -> dict:
    done = finished_summary(folder)
    if done is not None:
        return done
    opts = _options(folder, rt)
    log.info("finetune %s", folder)
    return finetune(None if opts.resume else config, None if opts.resume else spec, opts)


def _with(config: Config, **finetune_changes: Any) -> Config:
    return replace(config, finetune=replace(config.finetune, **finetune_changes))


def _validate_plan(config: Config, plan: Plan) -> None:
    """Refuse a plan that cannot run, before anything is written."""
    names = [amount_label(a) for a in plan.labels] + [subset_label(f) for f in plan.subset_files]
    if not names:
        raise UserError("experiment needs --labels or --subset-file (or both)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"the labelled amounts give the cell {twice[0]!r} twice; give each once")
    if plan.pretrained and (plan.tune_visible or plan.unlabelled_dir):
        raise UserError(
            "--pretrained reuses weights, so there is no pretraining to give --tune-visible or "
            "--unlabelled-dir; drop one or the other"
        )
    if plan.unlabelled_dir is not None and not Path(plan.unlabelled_dir).is_dir():
        raise UserError(f"--unlabelled-dir {plan.unlabelled_dir} is not a folder of images")
    if len(set(plan.tune_visible)) != len(plan.tune_visible):
        raise UserError(f"--tune-visible lists a value twice: {plan.tune_visible}")
    for p in plan.tune_visible:
        validate(_visible(config, p))  # each p leaves patches visible and masked


def _check_plan(out: Path, config: Config, plan: Plan) -> None:
    """An experiment folder belongs to one config (and one set of pretrainings): refuse to
    mix results of two."""
    _validate_plan(config, plan)
    path = out / "experiment.json"
    if path.exists():
        saved = json.loads(path.read_text())
        stored = config_from_dict(saved["config"])
        if stored != config:
            raise UserError(
                f"{out} holds an experiment with other settings (preset '{stored.name}'); "
                "use the same preset and --set values, or another --out"
            )
        # Finished runs would be reused as if made with these: the p tried, the pool.
        now = json.loads(json.dumps(asdict(plan)))
        for key, flag, default in (
            ("tune_visible", "--tune-visible", []),
            ("unlabelled_dir", "--unlabelled-dir", None),
        ):
            if saved["plan"].get(key, default) != now[key]:
                raise UserError(
                    f"{out} holds an experiment made with {flag} {saved['plan'].get(key)}, not "
                    f"{now[key]}; give the same, or another --out"
                )
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"config": config.to_dict(), "plan": asdict(plan)})


def _visible(config: Config, p: float) -> Config:
    return replace(config, pretrain=replace(config.pretrain, visible_fraction=p))


def _cells(plan: Plan) -> list[tuple[str, dict[str, Any]]]:
    """(cell name, the FinetuneSpec fields choosing its labelled images), in plan order."""
    cells: list[tuple[str, dict[str, Any]]] = [
        (amount_label(a), {"labels": a}) for a in plan.labels
    ]
    cells += [(subset_label(f), {"labels": None, "subset_file": f}) for f in plan.subset_files]
    return cells


def _pretrained_weights(config: Config, plan: Plan, out: Path, rt: Runtime) -> list[Weights]:
    """The weights the pretrained arm may start from: (p or None when p is not tuned, init)."""
    if plan.pretrained:
        return [(None, plan.pretrained)]
    if not plan.tune_visible:
        return [(None, run_pretrain(config, out / "pretrain", rt, plan.unlabelled_dir))]
    weights: list[Weights] = []
    for p in plan.tune_visible:
        folder = out / "pretrain" / f"p{p:g}"
        weights.append((p, run_pretrain(_visible(config, p), folder, rt, plan.unlabelled_dir)))
    return weights


def run_experiment(config: Config, plan: Plan, out: Path, rt: Runtime) -> list[report.Cell]:
    config = validate(config)
    refuse_data_dir(config.data.dataset, rt.data_dir)  # before the folder is written
    for listed in plan.subset_files:  # before hours of pretraining, not after
        read_subset_file(listed, train_names(config.data, rt.data_dir), config.data.dataset)
    _check_plan(out, config, plan)
    weights = _pretrained_weights(config, plan, out, rt)
    unlabelled = unlabelled_images(str(weights[0][1]))
    tuning: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for head in plan.heads:
        for label, labelled in _cells(plan):
            for arm in ARMS:
                options: list[Weights] = weights if arm == "pretrained" else [(None, None)]
                tuned = plan.tune or len(options) > 1
                lrs = config.finetune.lr_grid if plan.tune else (config.finetune.lr,)
                p, init, lr = options[0] + (config.finetune.lr,)
                if tuned:
                    row = {"head": head, "labels": label, "arm": arm}
                    trial = FinetuneSpec(head=head, validation=True, **labelled)
                    p, init, lr = _tune(config, trial, options, lrs, row, out, rt, tuning)
                spec = FinetuneSpec(head=head, init=init, **labelled)
                cell_config = config if p is None else _visible(config, p)
                for k in range(plan.seeds):
                    seed = config.finetune.seed + k
                    folder = out / "runs" / head / label / arm / f"seed{seed}"
                    s = run_finetune(_with(cell_config, lr=lr, seed=seed), spec, folder, rt)
                    results.append(
                        {
                            "head": head,
                            "labels": label,
                            "fraction": s["fraction"],
                            "arm": arm,
                            "seed": seed,
                            "lr": lr,
                            **({} if p is None else {"visible": p}),
                            "labelled_images": s["train_images"],
                            "unlabelled_images": unlabelled if arm == "pretrained" else 0,
                            "test_acc": s["test_acc"],
                            "run": str(folder.relative_to(out)),
                        }
                    )
                    # Rewritten after every run: partial results are readable at any time.
                    _write_lines(out / "results.jsonl", results)
    return report.write_report(out / "results.jsonl", out)


def _tune(
    config: Config,
    spec: FinetuneSpec,
    options: list[Weights],
    lrs: tuple[float, ...],
    row: dict[str, str],
    out: Path,
    rt: Runtime,
    tuning: list[dict[str, Any]],
) -> tuple[float | None, str | None, float]:
    """Finetune `spec` (a validation run) from each of `options` (the weights of each p; one
    for scratch) at each peak LR of `lrs`, appending each score to tuning.jsonl beside `row`
    (head, labels, arm); returns the (p, init, lr) of the best validation accuracy on the
    90/10 split (the test split is never read). A tie goes to the p listed first, then to
    the smaller LR."""
    where = out / "tune" / row["head"] / row["labels"] / row["arm"]
    best: tuple[tuple[float, int, float], float | None, str | None, float] | None = None
    for k, (p, init) in enumerate(options):
        cell_config = config if p is None else _visible(config, p)
        for lr in lrs:
            folder = (where if p is None else where / f"p{p:g}") / f"lr{lr:g}"
            s = run_finetune(_with(cell_config, lr=lr), replace(spec, init=init), folder, rt)
            visible = {} if p is None else {"visible": p}
            tuning.append({**row, "lr": lr, **visible, "val_acc": s["val_acc"]})
            _write_lines(out / "tuning.jsonl", tuning)
            key = (s["val_acc"], -k, -lr)
            if best is None or key > best[0]:
                best = (key, p, init, lr)
    assert best is not None
    return best[1], best[2], best[3]


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
