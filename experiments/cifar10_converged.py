"""Issue 11: the CIFAR-10 table with both arms finetuned to convergence, as one runner that
any session can continue from the committed files alone.

    python experiments/cifar10_converged.py [--hours H] [--fractions 0.08,0.05,0.2] [--fp32]
        [--data-dir ../shared/data/cifar10]

Stages, in order, each skipped where its result lines are already committed:

1. pretrain: P on all 50,000 training images for PRETRAIN_STEPS steps (4x the cifar10-cpu
   preset's 6,000, whose pretext accuracy was still rising), in runs/cifar10-converged/pretrain/
   (resumable there); once finished, its record and model.safetensors are copied into
   results/cifar10-converged/pretrain/ and committed, so later sessions and users finetune
   from the published P without pretraining.
2. converge (per fraction): both arms at finetuning lengths 600, 1200, 2400, ... steps of 128,
   2 seeds, LR SWEEP_LR, on the 90/10 split (validation accuracy; never the test set), until
   doubling the length adds less than 1 point to the scratch arm's mean validation accuracy
   and the scratch arm fits its training subset (>= 99% on its last training batches).
3. tune (per fraction and arm): the peak LR at the converged length, one seed, starting from
   {0.05, 0.1, 0.2} and extended along the paper's grid (and beyond it) while the best value
   lies on an edge, better than every other (a tie ends the search); the chosen LR is the
   best, ties going to an inner value, then to the smaller LR.
   The sweep's own LR-SWEEP_LR seed-0 run at that length is that LR's tuning run.
4. final (per fraction): 5 seeds per arm on the whole subset, test accuracy.
5. ablation (after every fraction), at 8%, the pretrained arm's 5 final seeds at 8%'s length
   and its pretrained arm's LR: first from the published P where the table's 8% lines came
   from another P (one lost with its machine: two P's pretrained alike measure how much the
   pretraining run itself moves the result), then from a P pretrained again with reflect
   padding instead of zeros (no black border to tell a patch's position), in
   pretrain-reflect/; finetuning keeps zero padding, as everywhere. ablation.jsonl (keyed by
   "pretraining", the P's folder), ablation.md.
6. Table 2: the attention-pooling head at 8%, both arms, at 8%'s length, its LR tuned as in
   stage 3, 5 seeds (results.jsonl, head "attention").

Result lines (committed as they come): convergence.jsonl (every stage-2 run), tuning.jsonl,
results.jsonl, ablation.jsonl; derived files: convergence.csv, table.md/.csv, figure.png,
gain.png, loss_vs_acc.png, ablation.md. Run folders go to runs/cifar10-converged/ (ignored): a
run interrupted there resumes on the same machine. A run can outlast a session (19,200 steps
take about 4 h on a Zen 3 here): stopped by Ctrl-C, SIGTERM or --stop-after H, the runner
stashes every unfinished run (its records and newest checkpoint, 10 MB) in
results/cifar10-converged/in-flight/; committed, it resumes from there on any machine, and the
finished run's line lists the earlier sessions ("carried"). bf16 autocast where the CPU has
native bf16, else fp32; finetuning runs torch.compile'd (--no-compile: eager); every line
records both, and a pretrained arm's line the sha256 of the P it started from.

    nohup python experiments/cifar10_converged.py --hours 2 --stop-after 2.5 > logs/c.log 2>&1 &
    # ... then commit results/cifar10-converged/ (in-flight/ included)
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from selfie import report
from selfie.checkpoint import checkpoint_path, checkpoint_step, list_checkpoints
from selfie.config import PAPER_LR_GRID, Config, get_preset
from selfie.data.subsets import amount_label
from selfie.device import cpu_bf16_emulated
from selfie.errors import UserError
from selfie.experiment import Runtime, finished_summary, run_finetune, run_pretrain
from selfie.finetune import FinetuneSpec
from selfie.runfolder import write_json

log = logging.getLogger("converged")

OUT = Path("results/cifar10-converged")
RUNS = Path("runs/cifar10-converged")
PRETRAIN_STEPS = 24_000
FIRST_LENGTH = 600  # the 600-step table of results/cifar10-cpu
LAST_LENGTH = FIRST_LENGTH * 2**5  # 19,200 steps: about 1 h 50 min a run in bf16 here
SWEEP_LR = 0.1
SWEEP_SEEDS = (0, 1)
CONVERGED_GAIN = 0.01  # doubling adds less than 1 point of validation accuracy
FITS_TRAINING = 0.99
FIRST_LRS = (0.05, 0.1, 0.2)
MIN_LR, MAX_LR = 1e-4, 6.4  # where the LR search gives up extending
FINAL_SEEDS = (0, 1, 2, 3, 4)
ARMS = ("scratch", "pretrained")
ABLATION_FRACTION = 0.08  # the ablation and Table 2: the paper's headline CIFAR-10 cell
# A pretraining run's files copied into the results (its checkpoints stay below runs/).
PUBLISHED = (
    "config.json",
    "metrics.jsonl",
    "pretext.png",
    "model.safetensors",
    "summary.json",
    "carried.json",
)
IN_FLIGHT = "in-flight"  # below OUT: unfinished runs carried to the next session (see stash)


@functools.cache
def machine() -> dict[str, Any]:
    """Where a result line was measured: the CPU model, the kernels torch runs, its threads,
    and the commit of this repository (None outside a git checkout)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    model = names[0] if names else platform.processor()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "cpu": model,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "commit": git.stdout.strip() or None,
    }


@functools.cache
def weights_sha256(path: str) -> str:
    """The sha256 of the weights file at `path`: which P a pretrained line started from (a
    fresh machine pretrains P again, and on another CPU kind that P differs)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def newest_step(folder: Path) -> int:
    """The step of the newest checkpoint in run folder `folder`; 0 where it has none."""
    found = list_checkpoints(folder / "checkpoints")
    return checkpoint_step(found[-1]) if found else 0


def carried_segments(folder: Path) -> list[dict[str, Any]]:
    """The earlier sessions of the run in `folder` (its carried.json; none if absent)."""
    path = folder / "carried.json"
    return json.loads(path.read_text()) if path.exists() else []


def base_config() -> Config:
    c = get_preset("cifar10-cpu")
    return replace(c, pretrain=replace(c.pretrain, steps=PRETRAIN_STEPS))


# --- the rules, pure functions of the result lines -------------------------------------------


def mean_val(rows: list[dict], fraction: float, arm: str, steps: int) -> tuple[float, float, int]:
    """Mean validation accuracy, mean final training accuracy and run count of the sweep runs
    of (fraction, arm, steps)."""
    found = [r for r in rows if (r["fraction"], r["arm"], r["steps"]) == (fraction, arm, steps)]
    n = len(found)
    if n == 0:
        return float("nan"), float("nan"), 0
    return (
        sum(r["val_acc"] for r in found) / n,
        sum(r["final_train_acc"] for r in found) / n,
        n,
    )


def gain_by_length(rows: list[dict], fraction: float) -> list[tuple[int, float]]:
    """(length, pretrained minus scratch mean validation accuracy) for every sweep length of
    `fraction` where both arms have all their seeds: the gain as a function of finetuning
    length (does it shrink, vanish or hold?)."""
    out = []
    for steps in sorted({r["steps"] for r in rows if r["fraction"] == fraction}):
        (scratch, _, n0), (pretrained, _, n1) = (
            mean_val(rows, fraction, arm, steps) for arm in ("scratch", "pretrained")
        )
        if min(n0, n1) == len(SWEEP_SEEDS):
            out.append((steps, pretrained - scratch))
    return out


def converged_length(
    rows: list[dict], fraction: float, first: int = FIRST_LENGTH, last: int = LAST_LENGTH
) -> int | None:
    """The shortest length L (first, 2 first, ...) whose doubling adds less than
    CONVERGED_GAIN to the scratch arm's mean validation accuracy, with the scratch arm fitting
    its training subset at L; `last` if no shorter one qualified once `last` has run (the
    cap: reported as not converged); None while the sweep must go on."""
    length = first
    while True:
        val, fit, n = mean_val(rows, fraction, "scratch", length)
        if n < len(SWEEP_SEEDS):
            return None
        if length >= last:
            return length
        val2, _, n2 = mean_val(rows, fraction, "scratch", 2 * length)
        if n2 < len(SWEEP_SEEDS):
            return None
        # Rounded: accuracies are counts over the validation images, so a gain of exactly
        # one point (0.664 - 0.654 = 0.00999999... in floats) is not "less than 1 point".
        if round(val2 - val, 9) < CONVERGED_GAIN and round(fit, 9) >= FITS_TRAINING:
            return length
        length *= 2


def next_lr(scores: dict[float, float]) -> float | None:
    """The next LR to try given validation accuracy per tried LR: the grid's next value past
    an edge whose score beats every other (the paper's grid, then halving or doubling); None
    when no edge does (a tie with an inner value ends the search) or past [MIN_LR, MAX_LR]."""
    tried = sorted(scores)
    grid = sorted(set(PAPER_LR_GRID) | set(tried))
    nxt = None
    if all(scores[tried[0]] > scores[lr] for lr in tried[1:]):
        lower = [lr for lr in grid if lr < tried[0]]
        nxt = lower[-1] if lower else tried[0] / 2
    elif all(scores[tried[-1]] > scores[lr] for lr in tried[:-1]):
        higher = [lr for lr in grid if lr > tried[-1]]
        nxt = higher[0] if higher else tried[-1] * 2
    return nxt if nxt is not None and MIN_LR <= nxt <= MAX_LR else None


def chosen_lr(scores: dict[float, float]) -> float:
    """The best LR; a tie goes to an inner value, then to the smaller LR."""
    tried = sorted(scores)
    edges = {tried[0], tried[-1]}
    return max(tried, key=lambda lr: (scores[lr], lr not in edges, -lr))


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def run_name(
    stage: str, fraction: float, arm: str, steps: int, lr: float, seed: int, head: str
) -> str:
    """A run's folder below runs/cifar10-converged/."""
    name = f"{head}-" if head != "resnet50" else ""
    return f"{stage}/{amount_label(fraction)}/{arm}/{name}steps{steps}-lr{lr:g}-seed{seed}"


# --- running ---------------------------------------------------------------------------------


class Ledger:
    """A committed .jsonl file of result lines, looked up by a few key fields."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = (
            [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.exists()
            else []
        )

    def find(self, **key: Any) -> dict[str, Any] | None:
        for row in self.rows:
            if all(row.get(k) == v for k, v in key.items()):
                return row
        return None

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class Runner:
    """The stages above for `config` (its pretraining section as run), writing result lines
    to `out` and run folders to `runs`; the tests run it on the tiny preset."""

    def __init__(
        self,
        config: Config,
        out: Path,
        runs: Path,
        rt: Runtime,
        hours: float = 1e9,
        first: int = FIRST_LENGTH,
        last: int = LAST_LENGTH,
    ) -> None:
        self.config, self.out, self.runs, self.rt = config, out, runs, rt
        self.deadline = time.monotonic() + 3600 * hours
        self.first, self.last = first, last
        machine()  # the commit as the runner starts
        self.weights = str(out / "pretrain" / "model.safetensors")  # see pretrain()
        out.mkdir(parents=True, exist_ok=True)
        # report.write_report reads the dataset (for the paper's columns) from here.
        write_json(out / "experiment.json", {"config": config.to_dict()})
        self.sweep = Ledger(out / "convergence.jsonl")
        self.tuning = Ledger(out / "tuning.jsonl")
        self.results = Ledger(out / "results.jsonl")
        self.ablation = Ledger(out / "ablation.jsonl")

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    # A run can outlast a session (19,200 steps take about 4 h on a Zen 3 here), and run
    # folders stay on their machine: stash() copies every unfinished run's newest checkpoint
    # and records into out/in-flight/ to be committed; carry_in() puts them back below runs/
    # on whatever machine continues, where the run resumes from them.

    def stash(self) -> list[str]:
        """Copy each unfinished run below `runs` whose newest checkpoint is newer than its
        copy in out/in-flight/ (the folder's files and that checkpoint, replacing the copy),
        with carried.json: the sessions that ran it so far (the step each reached, the
        machine, bf16, compile). Returns the runs stashed."""
        stashed = []
        for ckpts in sorted(self.runs.glob("**/checkpoints")):
            folder = ckpts.parent
            name = folder.relative_to(self.runs).as_posix()
            carried = self.out / IN_FLIGHT / name
            step = newest_step(folder)
            if finished_summary(folder) is not None or step <= newest_step(carried):
                continue
            segment = {"to_step": step, "bf16": self.rt.bf16, "compile": self.rt.compile}
            write_json(folder / "carried.json", [*carried_segments(folder), segment | machine()])
            shutil.rmtree(carried, ignore_errors=True)
            (carried / "checkpoints").mkdir(parents=True)
            for path in [
                *(p for p in folder.iterdir() if p.is_file()),
                checkpoint_path(ckpts, step),
            ]:
                shutil.copyfile(path, carried / path.relative_to(folder))
            log.info("stashed %s at step %d in %s", folder, step, carried)
            stashed.append(name)
        return stashed

    def carry_in(self, name: str) -> list[dict[str, Any]]:
        """Where out/in-flight/`name` holds a newer checkpoint than runs/`name`, copy it in (the
        run then resumes from it); the earlier sessions' segments of that run."""
        folder, carried = self.runs / name, self.out / IN_FLIGHT / name
        if newest_step(carried) > newest_step(folder):
            shutil.copytree(carried, folder, dirs_exist_ok=True)
            log.info("carried %s in at step %d", folder, newest_step(folder))
        return carried_segments(folder)

    def carried_out(self, name: str) -> None:
        """A finished run's in-flight copy is spent."""
        shutil.rmtree(self.out / IN_FLIGHT / name, ignore_errors=True)

    def pretrain(self, folder: Path, config: Config) -> str:
        """The weights of the pretraining published in `folder` (below `out`). Where `folder`
        lacks them, P is pretrained (compiled where the runtime is) in a run folder below
        `runs` (resumable there), and its record and weights are then copied into `folder`,
        replacing any record there, to be committed: the weights are what the issue asks to
        publish (2.3 MB), and a later session or a user finetunes from them."""
        weights = folder / "model.safetensors"
        if finished_summary(folder) is not None and weights.exists():
            return str(weights)
        run = self.runs / folder.name
        if finished_summary(run) is None:
            log.info("pretraining %s: %d steps", run, config.pretrain.steps)
            self.carry_in(folder.name)
            run_pretrain(config, run, self.rt)
        self.carried_out(folder.name)
        folder.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED:
            if (run / name).exists():
                shutil.copyfile(run / name, folder / name)
        log.info("published %s's record and weights in %s", run, folder)
        return str(weights)

    def finetune(
        self,
        stage: str,
        fraction: float,
        arm: str,
        steps: int,
        lr: float,
        seed: int,
        head: str = "resnet50",
        weights: str | None = None,
    ) -> dict[str, Any]:
        """One finetuning run's summary (validation accuracy in the stages "converge" and
        "tune", test accuracy otherwise), from `weights` (default: the main pretraining's) for
        the pretrained arm."""
        f = replace(self.config.finetune, steps=steps, lr=lr, seed=seed)
        config = replace(self.config, finetune=f)
        spec = FinetuneSpec(
            fraction,
            head=head,
            init=(weights or self.weights) if arm == "pretrained" else None,
            validation=stage in ("converge", "tune"),
        )
        name = run_name(stage, fraction, arm, steps, lr, seed, head)
        folder = self.runs / name
        carried = self.carry_in(name)
        t0 = time.monotonic()
        s = run_finetune(config, spec, folder, self.rt)
        self.carried_out(name)
        log.info(
            "%s %s %s: %.0f s",
            stage,
            folder,
            s.get("val_acc", s.get("test_acc")),
            time.monotonic() - t0,
        )
        keep = (
            "fraction",
            "arm",
            "steps",
            "lr",
            "seed",
            "final_loss",
            "final_train_acc",
            "train_images",
            "train_seconds_this_session",
            "bf16",
            "compile",
        )
        row = {k: s[k] for k in keep}
        row["fraction"] = fraction  # the asked fraction, the key (s["fraction"] is measured)
        row["measured_fraction"] = s["fraction"]
        if arm == "pretrained":
            row["init_sha256"] = weights_sha256(weights or self.weights)
        row |= {"wall_s": round(time.monotonic() - t0, 1)} | machine()
        if carried:
            row["carried"] = carried  # the earlier sessions; the fields above: the last one's
        return row | {k: s[k] for k in ("val_acc", "val_images", "test_acc") if k in s}

    def converge(self, fraction: float) -> int | None:
        """The converged length of `fraction`, once both arms have run at every length up to
        the longest tried (the gain-against-length figure; a sweep stopped between the arms of
        its last length completes it)."""
        length = self.first
        rows = self.sweep.rows
        while True:
            for arm in ARMS:
                for seed in SWEEP_SEEDS:
                    key = dict(fraction=fraction, arm=arm, steps=length, lr=SWEEP_LR, seed=seed)
                    if self.sweep.find(**key) is None:
                        if self.out_of_time():
                            return None
                        self.sweep.add(
                            self.finetune("converge", fraction, arm, length, SWEEP_LR, seed)
                        )
                        self.write_convergence()
                        self.figures()
            chosen = converged_length(rows, fraction, self.first, self.last)
            longer = any(r["fraction"] == fraction and r["steps"] > length for r in rows)
            if chosen is not None and not longer:
                return chosen
            length *= 2

    def tune(self, fraction: float, arm: str, steps: int, head: str = "resnet50") -> float | None:
        label = amount_label(fraction)
        scores: dict[float, float] = {}
        todo: list[float] = list(FIRST_LRS)
        while todo:
            lr = todo.pop(0)
            row = self.tuning.find(head=head, labels=label, arm=arm, lr=lr, steps=steps)
            sweep = self.sweep.find(fraction=fraction, arm=arm, steps=steps, lr=lr, seed=0)
            if row is None and head == "resnet50" and sweep is not None:
                row = {"head": head, "labels": label, "from": "convergence"} | sweep
                self.tuning.add(row)  # the same run: its seed, length, LR and split
            if row is None:
                if self.out_of_time():
                    return None
                s = self.finetune("tune", fraction, arm, steps, lr, seed=0, head=head)
                row = {"head": head, "labels": label} | s
                self.tuning.add(row)
            scores[lr] = row["val_acc"]
            if not todo and (nxt := next_lr(scores)) is not None:
                todo.append(nxt)
        return chosen_lr(scores)

    def final(
        self,
        fraction: float,
        arm: str,
        steps: int,
        lr: float,
        head: str = "resnet50",
        ledger: Ledger | None = None,
        weights: str | None = None,
        stage: str = "final",
        pretraining: str | None = None,
    ) -> bool:
        """The 5 final seeds of (fraction, arm, head) into `ledger` (default: results), run
        folders under runs/`stage`/; `pretraining` (the P's folder name) keys the lines of a
        ledger that holds runs from several P's."""
        ledger = ledger or self.results
        key = {"head": head, "labels": amount_label(fraction), "arm": arm}
        if pretraining is not None:
            key["pretraining"] = pretraining
        for seed in FINAL_SEEDS:
            if ledger.find(**key, seed=seed) is None:
                if self.out_of_time():
                    return False
                s = self.finetune(stage, fraction, arm, steps, lr, seed, head, weights)
                run = run_name(stage, fraction, arm, steps, lr, seed, head)
                ledger.add(key | {"run": run} | s)
                self.figures()
        return True

    def write_convergence(self) -> None:
        """convergence.csv: fraction,arm,steps,n,val_acc_mean (val_acc in [0, 1])."""
        keys = sorted({(r["fraction"], r["arm"], r["steps"]) for r in self.sweep.rows})
        with (self.out / "convergence.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["fraction", "arm", "steps", "n", "val_acc_mean"])
            for fraction, arm, steps in keys:
                val, _, n = mean_val(self.sweep.rows, fraction, arm, steps)
                w.writerow([fraction, arm, steps, n, f"{val:.4f}"])

    def run(self, fractions: list[float]) -> None:
        try:
            self._run(fractions)
        finally:
            self.figures()
            self.stash()

    def _run(self, fractions: list[float]) -> None:
        self.weights = self.pretrain(self.out / "pretrain", self.config)
        lengths: dict[float, int] = {}
        for fraction in fractions:
            steps = self.converge(fraction)
            if steps is None:
                log.info("stopped in the convergence sweep at %g", fraction)
                return
            log.info("%g: converged at %d steps", fraction, steps)
            lengths[fraction] = steps
            for arm in ARMS:
                lr = self.tune(fraction, arm, steps)
                if lr is None or not self.final(fraction, arm, steps, lr):
                    log.info("stopped at %g %s", fraction, arm)
                    return
        if ABLATION_FRACTION not in lengths:
            return
        steps = lengths[ABLATION_FRACTION]
        if not self.ablate(steps) or not self.table2(steps):
            log.info("stopped in the ablation or Table 2")

    def ablate(self, steps: int) -> bool:
        """Stage 5 at 8%, the pretrained arm: first from the published P where the table's
        lines came from another one (a P lost with its machine and pretrained again: the
        difference between two P's pretrained alike is the yardstick for the next step), then
        from a P pretrained with reflect padding."""
        lr = self.tune(ABLATION_FRACTION, "pretrained", steps)  # done: read from tuning.jsonl
        assert lr is not None
        label = amount_label(ABLATION_FRACTION)
        key = ("resnet50", label, "pretrained")
        made_from = {
            r.get("init_sha256")
            for r in self.results.rows
            if (r["head"], r["labels"], r["arm"]) == key
        }
        if made_from != {weights_sha256(self.weights)} and not self.final(
            ABLATION_FRACTION,
            "pretrained",
            steps,
            lr,
            ledger=self.ablation,
            stage="published-p",
            pretraining="pretrain",
        ):
            return False
        folder = self.out / "pretrain-reflect"
        if finished_summary(folder) is None and self.out_of_time():
            return False  # --hours holds for pretraining too: no new P starts past it
        d = self.config.data
        weights = self.pretrain(folder, replace(self.config, data=replace(d, pad_mode="reflect")))
        return self.final(
            ABLATION_FRACTION,
            "pretrained",
            steps,
            lr,
            ledger=self.ablation,
            weights=weights,
            stage="ablation",
            pretraining=folder.name,
        )

    def table2(self, steps: int) -> bool:
        """Stage 6: the attention-pooling head at 8%, both arms."""
        for arm in ARMS:
            lr = self.tune(ABLATION_FRACTION, arm, steps, head="attention")
            if lr is None or not self.final(ABLATION_FRACTION, arm, steps, lr, "attention"):
                return False
        return True

    def write_ablation(self) -> None:
        """ablation.md: test accuracy at 8% of the scratch arm and of the pretrained arm from
        each P (zero padding, the paper's, and reflect padding), each P named by its folder
        and the start of its sha256, then each P against the first zero-padded one (Welch)."""
        label = amount_label(ABLATION_FRACTION)
        arms: dict[str, list[float]] = {}
        rows = [(r, "pretrain") for r in self.results.rows]
        rows += [(r, r["pretraining"]) for r in self.ablation.rows]
        for r, pretraining in rows:
            if (r["head"], r["labels"]) != ("resnet50", label):
                continue
            if r["arm"] == "scratch":
                name = "scratch"
            else:
                padding = "reflect" if pretraining == "pretrain-reflect" else "zero (the paper's)"
                name = f"P {r['init_sha256'][:8]}, {padding} padding"
            arms.setdefault(name, []).append(100 * r["test_acc"])
        # scratch, the zero-padded P's in the order run, then the reflect one (a stable sort)
        arms = dict(sorted(arms.items(), key=lambda kv: (kv[0] != "scratch", "reflect" in kv[0])))
        lines = [
            f"# Ablation: the padding border cue ({ABLATION_FRACTION:.0%} labels, test accuracy %)",
            "",
            "| arm | n | mean ± std | against the first P (Welch p) |",
            "| --- | --- | --- | --- |",
        ]
        first = next((v for k, v in arms.items() if k.startswith("P ")), [])
        for name, values in arms.items():
            against = ""
            if name.startswith("P ") and values is not first and min(len(values), len(first)) > 1:
                p = stats.ttest_ind(values, first, equal_var=False).pvalue
                diff = statistics.mean(values) - statistics.mean(first)
                against = f"{diff:+.2f} (p = {p:.3g})"
            lines.append(f"| {name} | {len(values)} | {mean_std(values)} | {against} |")
        (self.out / "ablation.md").write_text("\n".join(lines) + "\n")

    def figures(self) -> None:
        """gain.png: validation accuracy of both arms against finetuning length, per fraction,
        and the gain (pretrained minus scratch) against length, every fraction in one panel;
        loss_vs_acc.png: the paper's Figure 3 check, final training loss against test
        accuracy of every final run; the table and figure of report.write_report; and
        ablation.md."""
        import matplotlib.pyplot as plt

        if self.ablation.rows:
            self.write_ablation()

        fractions = sorted({r["fraction"] for r in self.sweep.rows})
        if fractions:
            fig, axes = plt.subplots(
                1, len(fractions) + 1, figsize=(4.5 * (len(fractions) + 1), 3.6), squeeze=False
            )
            for ax, fraction in zip(axes[0], fractions, strict=False):
                lengths = sorted({r["steps"] for r in self.sweep.rows if r["fraction"] == fraction})
                for arm in ARMS:
                    points = [(n, mean_val(self.sweep.rows, fraction, arm, n)[0]) for n in lengths]
                    points = [(n, 100 * v) for n, v in points if v == v]  # drop NaN (not run)
                    line = ax.plot(*zip(*points, strict=True), "o-", label=report.ARM_NAMES[arm])
                    key = (fraction, arm)
                    runs = [r for r in self.sweep.rows if (r["fraction"], r["arm"]) == key]
                    ax.scatter(
                        [r["steps"] for r in runs],
                        [100 * r["val_acc"] for r in runs],
                        s=12,
                        alpha=0.5,
                        color=line[0].get_color(),
                    )  # each seed
                ax.set_xscale("log", base=2)
                ax.set_xticks(lengths, [str(n) for n in lengths])
                ax.set_title(
                    f"{100 * fraction:g}% labels (LR {SWEEP_LR:g}; mean and each of "
                    f"{len(SWEEP_SEEDS)} seeds)"
                )
                ax.set_xlabel("finetuning steps of 128")
                ax.set_ylabel("validation accuracy (%)")
                ax.grid(alpha=0.3)
            axes[0][0].legend()
            ax = axes[0][-1]  # the gain itself, every fraction in one panel
            for fraction in fractions:
                points = gain_by_length(self.sweep.rows, fraction)
                if points:
                    steps, gains = zip(*points, strict=True)
                    ax.plot(steps, [100 * g for g in gains], "o-", label=f"{100 * fraction:g}%")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            lengths = sorted({r["steps"] for r in self.sweep.rows})
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_title("Selfie's gain (mean of each arm's seeds)")
            ax.set_xlabel("finetuning steps of 128")
            ax.set_ylabel("pretrained - scratch (validation points)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # empty until a fraction has both arms
                ax.legend(title="labels")
            fig.tight_layout()
            fig.savefig(self.out / "gain.png", dpi=120)
            plt.close(fig)
        if self.results.rows:
            report.write_report(self.results.path, self.out)
            self.loss_figure()

    def loss_figure(self) -> None:
        """loss_vs_acc.png: the paper's Figure 3 check (pretrained models end at a higher
        training loss yet test better), one panel per head and labelled fraction: every final
        run's training loss over its last logging window against its test accuracy."""
        import matplotlib.pyplot as plt

        cells = sorted({(r["head"], r["fraction"]) for r in self.results.rows})
        fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
        for ax, (head, fraction) in zip(axes[0], cells, strict=True):
            for arm in ARMS:
                key = (head, fraction, arm)
                rows = [r for r in self.results.rows if (r["head"], r["fraction"], r["arm"]) == key]
                ax.scatter(
                    [r["final_loss"] for r in rows],
                    [100 * r["test_acc"] for r in rows],
                    label=report.ARM_NAMES[arm],
                )
            name = "" if head == "resnet50" else f", {head} head"
            ax.set_title(f"{100 * fraction:g}% labels{name}")
            ax.set_xlabel("final training loss")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.suptitle("Figure 3 check: every final run")
        fig.tight_layout()
        fig.savefig(self.out / "loss_vs_acc.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hours",
        type=float,
        default=1e9,
        help="start no new run after this many hours (the current one ends)",
    )
    parser.add_argument(
        "--fractions",
        default="0.08,0.05,0.2",
        help="labelled fractions, in the order run (8%% first: the paper's headline CIFAR-10 cell)",
    )
    parser.add_argument(
        "--data-dir", default="../shared/data/cifar10", help="CIFAR-10 (python version)"
    )
    parser.add_argument("--fp32", action="store_true", help="fp32 even where bf16 is native")
    parser.add_argument(
        "--stop-after",
        type=float,
        metavar="H",
        help="interrupt the current run after H hours, as Ctrl-C does: it saves, and every "
        f"unfinished run is stashed in {OUT / IN_FLIGHT}/ (commit it; any machine continues)",
    )
    parser.add_argument(
        "--stash",
        action="store_true",
        help=f"only stash the unfinished runs below {RUNS}/ in {OUT / IN_FLIGHT}/ (after a "
        "runner was killed without saving: from their newest checkpoints)",
    )
    parser.add_argument(
        "--figures", action="store_true", help="only redraw the figures and tables from the lines"
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="finetune eagerly (default: torch.compile: 1.19x the eager finetuning steps/s on a "
        "Zen 4 in bf16, 0.97x on a Zen 3 in fp32: benchmarks/throughput.py --compile)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bf16 = not args.fp32 and cpu_bf16_emulated() is None
    rt = Runtime(
        data_dir=args.data_dir,
        device="cpu",
        bf16=bf16,
        progress=False,
        compile=not args.no_compile,
        # Quoted by an interrupted run: the runner resumes it (on another machine: once the
        # stash in OUT/in-flight/ is committed and pulled there).
        resume_hint="python " + shlex.join(sys.argv),
    )
    fractions = [float(f) for f in args.fractions.split(",")]
    runner = Runner(base_config(), OUT, RUNS, rt, args.hours)
    if args.figures:
        runner.write_convergence()
        runner.figures()
        return
    if args.stash:
        runner.stash()
        return
    if args.stop_after is not None:
        # SIGINT: the run in progress saves and stops, as on Ctrl-C (between runs: below).
        stop = threading.Timer(3600 * args.stop_after, os.kill, (os.getpid(), signal.SIGINT))
        stop.daemon = True
        stop.start()
    try:
        runner.run(fractions)
    except UserError as e:  # Interrupted too: one line with the step; rerun this to resume
        print(f"cifar10_converged: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("cifar10_converged: interrupted between runs; rerun this to go on", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
