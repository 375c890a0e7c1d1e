"""Finetuning runs per hour on this machine: one run at a time with every core, against as many
runs side by side as there are cores, one thread each (what a runner of many small
independent runs, such as experiments/cifar10_converged.py, could do instead). Both ways run
the same `selfie finetune` command in fresh processes, measured in one invocation. Prints
figures; asserts nothing.

    python benchmarks/parallel_runs.py [--preset cifar10-cpu] [--labels 0.08] [--steps 400]
        [--bf16] [--compile] [--data-dir ../shared/data/cifar10]

The last line is one JSON object: `runs_per_hour_serial`, `runs_per_hour_side_by_side` and
their ratio, from wall time (start-up and compilation included, as a runner pays them) and
from the runs' own training seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def launch(args: argparse.Namespace, out: Path, seed: int, threads: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "selfie.cli",
        "finetune",
        "--preset",
        args.preset,
        "--labels",
        str(args.labels),
        "--scratch",
        "--validation",
        "--steps",
        str(args.steps),
        "--seed",
        str(seed),
        "--data-dir",
        args.data_dir,
        "--out",
        str(out),
        "--set",
        f"finetune.checkpoint_every={args.steps}",
    ]
    command += ["--bf16"] * args.bf16 + ["--compile"] * args.compile
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_together(args: argparse.Namespace, root: Path, name: str, n: int, threads: int) -> dict:
    """Wall time of `n` runs started together with `threads` threads each, and the mean of
    their own training seconds."""
    t0 = time.perf_counter()
    procs = [launch(args, root / f"{name}{i}", i, threads) for i in range(n)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"parallel_runs: a run failed:\n{err.decode()[-2000:]}")
    wall = time.perf_counter() - t0
    train = [
        json.loads((root / f"{name}{i}" / "summary.json").read_text())["train_seconds_this_session"]
        for i in range(n)
    ]
    return {"runs": n, "threads_each": threads, "wall_s": wall, "train_s_mean": sum(train) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--labels", type=float, default=0.08)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--data-dir", default="../shared/data/cifar10")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_together(args, root, "warm", 1, args.cores)  # data and compile caches, not timed
        serial = run_together(args, root, "serial", 1, args.cores)
        side = run_together(args, root, "side", args.cores, 1)
    per_hour_serial = 3600 / serial["wall_s"]
    per_hour_side = 3600 * args.cores / side["wall_s"]
    train_ratio = args.cores * serial["train_s_mean"] / side["train_s_mean"]
    print(f"one run, {args.cores} threads:        {serial['wall_s']:.1f} s wall")
    print(f"{args.cores} runs side by side, 1 thread each: {side['wall_s']:.1f} s wall")
    print(f"runs per hour: {per_hour_serial:.1f} serial, {per_hour_side:.1f} side by side")
    result = {
        "preset": args.preset,
        "labels": args.labels,
        "steps": args.steps,
        "bf16": args.bf16,
        "compile": args.compile,
        "serial": serial,
        "side_by_side": side,
        "runs_per_hour_serial": per_hour_serial,
        "runs_per_hour_side_by_side": per_hour_side,
        "ratio_wall": per_hour_side / per_hour_serial,
        "ratio_train_seconds": train_ratio,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
