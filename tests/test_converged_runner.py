"""experiments/cifar10_converged.py: its convergence and LR rules, and the whole runner on the
tiny preset (every stage, its files, and a second call that runs nothing)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from selfie.config import get_preset
from selfie.experiment import Runtime

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "cifar10_converged", ROOT / "experiments" / "cifar10_converged.py"
)
assert _spec is not None and _spec.loader is not None
converged = importlib.util.module_from_spec(_spec)
sys.modules["cifar10_converged"] = converged
_spec.loader.exec_module(converged)

pytestmark = pytest.mark.usefixtures("one_thread")


def sweep_rows(points: dict[int, tuple[float, float]], arm: str = "scratch") -> list[dict]:
    """Two seeds per length with mean (val_acc, final_train_acc) as given."""
    return [
        {
            "fraction": 0.08,
            "arm": arm,
            "steps": steps,
            "seed": seed,
            "val_acc": val + (0.002 if seed else -0.002),
            "final_train_acc": fit,
        }
        for steps, (val, fit) in points.items()
        for seed in (0, 1)
    ]


def test_converged_length_follows_the_rule():
    rule = converged.converged_length
    # 600 -> 1200 adds 5 points: not yet; 1200 -> 2400 adds 0.5 and 1200 fits: 1200.
    rows = sweep_rows({600: (0.60, 0.9), 1200: (0.65, 0.995), 2400: (0.655, 1.0)})
    assert rule(rows, 0.08) == 1200
    # The same gains, but 1200 does not fit its training subset: go on (2400 needs 4800).
    rows = sweep_rows({600: (0.60, 0.9), 1200: (0.65, 0.95), 2400: (0.655, 1.0)})
    assert rule(rows, 0.08) is None
    # A length without both seeds is not decided; the pretrained arm does not count.
    rows = sweep_rows({600: (0.60, 0.9)}) + sweep_rows({1200: (0.60, 1.0)}, arm="pretrained")
    assert rule(rows, 0.08) is None
    # The cap: at `last` the sweep stops whatever the gain.
    rows = sweep_rows({600: (0.60, 0.9), 1200: (0.70, 0.9)})
    assert rule(rows, 0.08, first=600, last=1200) == 1200
    assert rule(rows, 0.05) is None  # another fraction's rows
    # A gain of exactly one point is not less than one point, whatever floats make of it:
    # 5%'s scratch lines at 2,400 and 4,800 steps (250 validation images), whose means
    # 0.654 -> 0.664 differ by 0.00999999... in floats.
    rows = sweep_rows({600: (0.60, 0.9), 1200: (0.62, 0.99)})
    rows += [
        {"fraction": 0.08, "arm": "scratch", "steps": n, "seed": seed, "val_acc": v}
        | {"final_train_acc": 1.0}
        for n, seed, v in ((2400, 0, 0.656), (2400, 1, 0.652), (4800, 0, 0.688), (4800, 1, 0.64))
    ]
    assert rule(rows, 0.08) is None
    rows[-1]["val_acc"] = 0.6396  # a gain under one point: converged at 2,400
    assert rule(rows, 0.08) == 2400


def test_the_gain_by_length_needs_both_arms_with_every_seed():
    rows = sweep_rows({600: (0.60, 0.8), 1200: (0.70, 0.99), 2400: (0.71, 1.0)})
    rows += sweep_rows({600: (0.75, 0.9), 1200: (0.78, 1.0)}, arm="pretrained")
    rows += sweep_rows({2400: (0.8, 1.0)}, arm="pretrained")[:1]  # one of its two seeds
    gains = converged.gain_by_length(rows, 0.08)
    assert [steps for steps, _ in gains] == [600, 1200]  # 2,400: the pretrained seed 1 is missing
    assert gains[0][1] == pytest.approx(0.15) and gains[1][1] == pytest.approx(0.08)
    assert converged.gain_by_length(rows, 0.05) == []


def test_next_lr_extends_the_grid_until_the_best_is_inside():
    nxt = converged.next_lr
    assert nxt({0.05: 0.6, 0.1: 0.7, 0.2: 0.65}) is None
    assert nxt({0.05: 0.6, 0.1: 0.65, 0.2: 0.7}) == 0.4  # the paper's grid goes on
    assert nxt({0.05: 0.6, 0.1: 0.65, 0.2: 0.66, 0.4: 0.7}) == 0.8  # and beyond it
    assert nxt({0.05: 0.7, 0.1: 0.65, 0.2: 0.6}) == 0.02
    assert nxt({0.01: 0.7, 0.02: 0.6}) == 0.005
    # An edge tied with an inner value ends the search, and the inner value is chosen.
    assert nxt({0.05: 0.7, 0.1: 0.7, 0.2: 0.6}) is None
    assert converged.chosen_lr({0.05: 0.7, 0.1: 0.7, 0.2: 0.6}) == 0.1
    assert converged.chosen_lr({0.05: 0.6, 0.1: 0.7, 0.2: 0.7, 0.4: 0.7}) == 0.1
    assert nxt({0.05: 0.7, 0.1: 0.7, 0.2: 0.7}) is None  # flat: no direction to go
    # The search gives up past MIN_LR and MAX_LR.
    assert nxt({0.0002: 0.7, 0.0004: 0.6, 0.0008: 0.5}) == 0.0001
    assert nxt({0.0001: 0.7, 0.0002: 0.6, 0.0004: 0.5}) is None
    assert nxt({1.6: 0.5, 3.2: 0.6, 6.4: 0.7}) is None


def test_the_sweep_runs_the_pretrained_arm_at_every_length_the_scratch_arm_ran(
    tmp_path, monkeypatch
):
    # Scratch decided the length (2,400: 4,800 gains nothing) but the sweep stopped before the
    # pretrained arm's 4,800-step runs: only those run, then the length is returned.
    runner = converged.Runner(get_preset("tiny"), tmp_path / "out", tmp_path / "runs", Runtime())
    scratch = {600: (0.60, 0.9), 1200: (0.65, 0.99), 2400: (0.70, 1.0), 4800: (0.70, 1.0)}
    pretrained = {n: (0.75, 1.0) for n in (600, 1200, 2400)}
    for row in sweep_rows(scratch) + sweep_rows(pretrained, "pretrained"):
        runner.sweep.add(row | {"lr": converged.SWEEP_LR})
    ran: list[tuple] = []

    def finetune(stage, fraction, arm, steps, lr, seed, *args):
        ran.append((stage, fraction, arm, steps, lr, seed))
        key = {"fraction": fraction, "arm": arm, "steps": steps, "lr": lr, "seed": seed}
        return key | {"val_acc": 0.75, "final_train_acc": 1.0}

    monkeypatch.setattr(runner, "finetune", finetune)
    monkeypatch.setattr(runner, "figures", lambda: None)
    assert runner.converge(0.08) == 2400
    assert ran == [("converge", 0.08, "pretrained", 4800, 0.1, seed) for seed in (0, 1)]
    assert runner.converge(0.08) == 2400 and len(ran) == 2  # nothing left to run


def test_a_run_stopped_in_one_session_resumes_from_the_committed_files_on_another(
    tmp_path, monkeypatch
):
    """Interrupted after its step-3 checkpoint, a sweep run is stashed in out/in-flight/; with
    runs/ gone (another machine) the runner carries it in and resumes it at step 3, ending
    with the weights of an uninterrupted run; its line lists the earlier session and the
    spent stash is removed."""
    import selfie.engine
    from selfie.errors import Interrupted

    tiny = get_preset("tiny")
    out, runs = tmp_path / "out", tmp_path / "runs"
    runner = converged.Runner(tiny, out, runs, Runtime(device="cpu", progress=False), first=8)
    save = selfie.engine.TrainLoop.save

    def save_then_stop(loop, step):
        save(loop, step)
        raise Interrupted(f"SIGINT at step {step}")

    monkeypatch.setattr(selfie.engine.TrainLoop, "save", save_then_stop)
    monkeypatch.setattr(runner, "pretrain", lambda folder, config: "unused")
    with pytest.raises(Interrupted):
        runner.run([0.5])
    name = converged.run_name("converge", 0.5, "scratch", 8, converged.SWEEP_LR, 0, "resnet50")
    stash = out / converged.IN_FLIGHT / name
    assert [p.name for p in (stash / "checkpoints").iterdir()] == ["step_0000003.pt"]
    assert (stash / "config.json").is_file() and (stash / "subset.json").is_file()
    [segment] = json.loads((stash / "carried.json").read_text())
    assert segment["to_step"] == 3 and segment["bf16"] is False and "cpu" in segment
    assert runner.stash() == []  # nothing newer to stash
    monkeypatch.setattr(selfie.engine.TrainLoop, "save", save)

    shutil.rmtree(runs)
    resumed_at: list[int] = []
    run_finetune = converged.run_finetune

    def spy(config, spec, folder, rt):
        resumed_at.append(converged.newest_step(folder))
        return run_finetune(config, spec, folder, rt)

    monkeypatch.setattr(converged, "run_finetune", spy)
    row = runner.finetune("converge", 0.5, "scratch", 8, converged.SWEEP_LR, 0)
    assert resumed_at == [3]
    assert row["carried"] == [segment]
    assert not stash.exists()
    whole = converged.Runner(tiny, out, tmp_path / "whole", runner.rt, first=8)
    again = whole.finetune("converge", 0.5, "scratch", 8, converged.SWEEP_LR, 0)
    assert "carried" not in again
    assert (row["final_loss"], row["val_acc"]) == (again["final_loss"], again["val_acc"])


def test_the_runner_on_tiny_runs_every_stage_once(tmp_path, monkeypatch):
    tiny = get_preset("tiny")
    out, runs = tmp_path / "out", tmp_path / "runs"
    rt = Runtime(device="cpu", progress=False)
    monkeypatch.setattr(converged, "FINAL_SEEDS", (0, 1))
    monkeypatch.setattr(converged, "ABLATION_FRACTION", 0.5)  # stages 5 and 6 run too

    def runner():
        return converged.Runner(tiny, out, runs, rt, first=2, last=4)

    runner().run([0.5])
    sweep = [json.loads(line) for line in (out / "convergence.jsonl").read_text().splitlines()]
    # Lengths 2 and 4 (the cap), both arms, both sweep seeds, on validation only.
    assert sorted((r["steps"], r["arm"], r["seed"]) for r in sweep) == sorted(
        (n, arm, seed) for n in (2, 4) for arm in ("scratch", "pretrained") for seed in (0, 1)
    )
    assert all("val_acc" in r and "test_acc" not in r for r in sweep)
    assert all(
        {"cpu", "cpu_kernels", "threads", "commit", "wall_s", "compile"} <= r.keys() for r in sweep
    )
    table = list(csv.DictReader((out / "convergence.csv").open()))
    assert [r["steps"] for r in table] == ["2", "4", "2", "4"]
    assert {r["n"] for r in table} == {"2"}
    tuning = [json.loads(line) for line in (out / "tuning.jsonl").read_text().splitlines()]
    for arm in ("scratch", "pretrained"):
        lrs = sorted(r["lr"] for r in tuning if r["arm"] == arm)
        scores = {r["lr"]: r["val_acc"] for r in tuning if r["arm"] == arm}
        assert {0.05, 0.1, 0.2} <= set(lrs) and converged.next_lr(scores) is None
        assert all(r["steps"] == 4 for r in tuning)
    # LR 0.1's tuning run is the sweep's seed-0 run at the converged length, not a rerun.
    reused = [r for r in tuning if r.get("from") == "convergence"]
    assert sorted((r["head"], r["arm"], r["lr"]) for r in reused) == [
        ("resnet50", "pretrained", 0.1),
        ("resnet50", "scratch", 0.1),
    ]
    assert {r["head"] for r in tuning} == {"resnet50", "attention"}  # Table 2's own LR search
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["head"], r["arm"]) for r in results) == sorted(
        (head, arm)
        for head in ("resnet50", "attention")
        for arm in ("scratch", "pretrained")
        for _ in (0, 1)
    )
    assert all("test_acc" in r and r["steps"] == 4 for r in results)
    for name in ("table.md", "table.csv", "figure.png", "gain.png", "loss_vs_acc.png"):
        assert (out / name).stat().st_size > 0, name
    assert "Table 2" in (out / "table.md").read_text()
    assert (out / "pretrain" / "model.safetensors").is_file()
    # The ablation: P pretrained again with reflect padding; its arm finetunes with zeros.
    reflect = json.loads((out / "pretrain-reflect" / "config.json").read_text())
    assert reflect["config"]["data"]["pad_mode"] == "reflect"
    ablation = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["seed"]) for r in ablation] == [("pretrained", 0), ("pretrained", 1)]
    run = json.loads((runs / ablation[0]["run"] / "config.json").read_text())
    assert run["config"]["data"]["pad_mode"] == "zero"
    assert str(out / "pretrain-reflect") in run["run"]["finetune"]["init"]
    # Every pretrained line names the P it started from; the ablation's is the reflect one.
    main_p = converged.weights_sha256(str(out / "pretrain" / "model.safetensors"))
    reflect_p = converged.weights_sha256(str(out / "pretrain-reflect" / "model.safetensors"))
    assert main_p != reflect_p
    main_lines = sweep + tuning + results
    assert {r.get("init_sha256") for r in main_lines if r["arm"] == "pretrained"} == {main_p}
    assert all("init_sha256" not in r for r in main_lines if r["arm"] == "scratch")
    assert {r["init_sha256"] for r in ablation} == {reflect_p}
    assert [r["pretraining"] for r in ablation] == ["pretrain-reflect"] * 2

    # Where the table's lines came from another P (one lost with its machine), stage 5 first
    # finetunes the pretrained arm from the published P as well: two P's side by side.
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in lines:
        if r["arm"] == "pretrained":
            r["init_sha256"] = "0" * 64
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    runner().run([0.5])
    ablation = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines()]
    second = [r for r in ablation if r["pretraining"] == "pretrain"]
    assert [(r["seed"], r["init_sha256"]) for r in second] == [(0, main_p), (1, main_p)]
    assert all(r["run"].startswith("published-p/") for r in second)
    text = (out / "ablation.md").read_text()
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")][2:]
    assert rows == [
        "| scratch",
        "| P 00000000, zero (the paper's) padding",
        f"| P {main_p[:8]}, zero (the paper's) padding",
        f"| P {reflect_p[:8]}, reflect padding",
    ]
    assert text.count("(p = ") == 2  # each later P against the first

    # A second runner finds every line and runs nothing.
    import selfie.experiment

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(converged, "run_finetune", fail)
    monkeypatch.setattr(selfie.experiment, "pretrain", fail)
    runner().run([0.5])

    # P was pretrained below runs/ and published with its record in the results folder.
    assert (runs / "pretrain" / "model.safetensors").read_bytes() == (
        out / "pretrain" / "model.safetensors"
    ).read_bytes()
    # Where the published weights are missing and no run below runs/ holds them (a fresh
    # machine with an older record), P is pretrained again there and published over it.
    (out / "pretrain" / "model.safetensors").unlink()
    shutil.rmtree(runs / "pretrain")
    folders: list[Path] = []

    def pretrain_again(config, opts):
        folders.append(opts.out)
        opts.out.mkdir(parents=True)
        (opts.out / "model.safetensors").write_bytes(b"another P")
        (opts.out / "summary.json").write_text("{}")

    monkeypatch.setattr(selfie.experiment, "pretrain", pretrain_again)
    runner().run([0.5])
    assert folders == [runs / "pretrain"]
    assert (out / "pretrain" / "model.safetensors").read_bytes() == b"another P"
    assert (out / "pretrain" / "summary.json").read_text() == "{}"

    # Past --hours no pretraining starts either: the missing reflect-padded P waits.
    shutil.rmtree(out / "pretrain-reflect")
    shutil.rmtree(runs / "pretrain-reflect")
    converged.Runner(tiny, out, runs, rt, hours=0, first=2, last=4).run([0.5])
    assert folders == [runs / "pretrain"]
    assert not (out / "pretrain-reflect").exists()
