"""`selfie experiment` and `selfie report` on the tiny preset: the protocol's files, LR tuning
by validation accuracy, resuming, reused weights, re-rendering and refusing mixed settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from selfie import cli
from selfie.report import CSV_COLUMNS
from tests.helpers import run_cli

# 2 heads x 2 labelled amounts x 2 arms, each tuned over the tiny grid (0.02, 0.05) and then
# run with 2 seeds. Four finetuning steps with a checkpoint every two, so a run can be cut
# between its checkpoints.
ARGS = [
    "experiment",
    "--preset",
    "tiny",
    "--labels",
    "3,0.05",
    "--seeds",
    "2",
    "--tune",
    "--heads",
    "resnet50,attention",
    "--set",
    "pretrain.steps=2",
    "--set",
    "finetune.steps=4",
    "--set",
    "finetune.checkpoint_every=2",
]
RESULT_KEYS = {"head", "labels", "fraction", "arm", "seed", "lr", "test_acc", "run"}
RESULT_KEYS |= {"labelled_images", "unlabelled_images"}


pytestmark = pytest.mark.usefixtures("one_thread")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """One finished experiment folder; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("experiment") / "exp"
    assert cli.main(["-q", *ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture
def calls(monkeypatch) -> dict[str, list[Path]]:
    """Count the runs the experiment starts: the folders passed to finetune and pretrain,
    and (in "resumed") the finetuning runs it continued rather than started afresh."""
    import selfie.experiment

    seen: dict[str, list[Path]] = {"finetune": [], "pretrain": [], "resumed": []}
    real_finetune, real_pretrain = selfie.experiment.finetune, selfie.experiment.pretrain

    def finetune(config, spec, opts):
        seen["finetune"].append(Path(opts.out))
        if opts.resume:
            seen["resumed"].append(Path(opts.out))
        return real_finetune(config, spec, opts)

    def pretrain(config, opts):
        seen["pretrain"].append(Path(opts.out))
        return real_pretrain(config, opts)

    monkeypatch.setattr(selfie.experiment, "finetune", finetune)
    monkeypatch.setattr(selfie.experiment, "pretrain", pretrain)
    return seen


def test_experiment_writes_results_tuning_and_report(experiment: Path):
    """16 final runs and 16 tuning runs are recorded; table, csv, figure and plan are written."""
    rows = read_lines(experiment / "results.jsonl")
    assert len(rows) == 16
    assert all(set(r) == RESULT_KEYS for r in rows)
    cells = {(r["head"], r["labels"], r["arm"], r["seed"]) for r in rows}
    assert cells == {
        (h, a, arm, s)
        for h in ("resnet50", "attention")
        for a in ("3pc", "frac0.05")
        for arm in ("pretrained", "scratch")
        for s in (0, 1)
    }
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    pretrained_on = json.loads((experiment / "pretrain" / "summary.json").read_text())
    assert pretrained_on["train_images"] == 1437  # every training digit
    for r in rows:
        summary = json.loads((experiment / r["run"] / "summary.json").read_text())
        assert summary["test_acc"] == r["test_acc"] and summary["seed"] == r["seed"]
        assert summary["arm"] == r["arm"] and summary["head"] == r["head"]
        assert (
            r["labelled_images"] == summary["train_images"] == (30 if r["labels"] == "3pc" else 70)
        )
        assert r["unlabelled_images"] == (1437 if r["arm"] == "pretrained" else 0)

    tuning = read_lines(experiment / "tuning.jsonl")
    assert len(tuning) == 16
    assert {(t["head"], t["labels"], t["arm"], t["lr"]) for t in tuning} == {
        (h, a, arm, lr)
        for h in ("resnet50", "attention")
        for a in ("3pc", "frac0.05")
        for arm in ("pretrained", "scratch")
        for lr in (0.02, 0.05)
    }
    assert all(0.0 <= t["val_acc"] <= 1.0 for t in tuning)

    table = (experiment / "table.md").read_text()
    assert "Table 1" in table and "Table 2" in table
    # Each cell says what it used: unlabelled / labelled images and their ratio.
    assert "| 3/class (2.09%) |" in table and "| 1,437 / 30 (47.9x) |" in table
    assert "| 1,437 / 70 (20.5x) |" in table
    csv_lines = (experiment / "table.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == CSV_COLUMNS and len(csv_lines) == 1 + 4
    assert (experiment / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads((experiment / "experiment.json").read_text())
    assert plan["plan"]["seeds"] == 2 and plan["plan"]["tune"] is True
    assert plan["config"]["finetune"]["steps"] == 4
    assert (experiment / "pretrain" / "model.safetensors").exists()


def test_final_runs_use_the_best_validation_lr(experiment: Path):
    """Each final run trains with the grid LR of best val_acc for its cell (tie: smaller LR)."""
    tuning = read_lines(experiment / "tuning.jsonl")
    for r in read_lines(experiment / "results.jsonl"):
        scores = [
            (t["val_acc"], t["lr"])
            for t in tuning
            if (t["head"], t["labels"], t["arm"]) == (r["head"], r["labels"], r["arm"])
        ]
        best = max(acc for acc, _ in scores)
        assert r["lr"] == min(lr for acc, lr in scores if acc == best), r
        config = json.loads((experiment / r["run"] / "config.json").read_text())
        assert config["config"]["finetune"]["lr"] == r["lr"]
        # Tuning runs validate on a held-out 10% and never see the test split.
        tune_dir = experiment / "tune" / r["head"] / r["labels"] / r["arm"] / f"lr{r['lr']:g}"
        tuned = json.loads((tune_dir / "summary.json").read_text())
        assert tuned["validation"] is True and "test_acc" not in tuned


def test_tuning_picks_best_val_lr_and_smaller_on_ties(tmp_path: Path, capsys, monkeypatch):
    """With val_acc given per LR, the final runs use the best LR; a tie goes to the smaller."""
    import selfie.experiment

    val_acc = {  # (head, arm) -> {grid LR: val_acc}
        ("resnet50", "scratch"): {0.01: 0.3, 0.02: 0.5, 0.05: 0.7},
        ("resnet50", "pretrained"): {0.01: 0.2, 0.02: 0.6, 0.05: 0.6},
        ("attention", "scratch"): {0.01: 0.9, 0.02: 0.1, 0.05: 0.9},
        ("attention", "pretrained"): {0.01: 0.4, 0.02: 0.8, 0.05: 0.1},
    }
    best = {
        ("resnet50", "scratch"): 0.05,
        ("resnet50", "pretrained"): 0.02,
        ("attention", "scratch"): 0.01,
        ("attention", "pretrained"): 0.02,
    }
    used: list[tuple[str, str, bool, float]] = []

    def fake_finetune(config, spec, opts):
        f = config.finetune
        used.append((spec.head, spec.arm, spec.validation, f.lr))
        score = {"val_acc": val_acc[(spec.head, spec.arm)][f.lr]} if spec.validation else {}
        return {"fraction": 0.1, "test_acc": 0.5, "train_images": 10, **score}

    monkeypatch.setattr(selfie.experiment, "finetune", fake_finetune)
    out = tmp_path / "exp"
    code, _, err = run_cli(
        [
            *ARGS[:7],  # experiment --preset tiny --labels 3,0.05 --seeds 2
            "--tune",
            "--heads",
            "resnet50,attention",
            "--pretrained",
            str(tmp_path / "weights"),
            "--set",
            "finetune.lr_grid=(0.01,0.02,0.05)",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    rows = read_lines(out / "results.jsonl")
    assert len(rows) == 16
    for r in rows:
        assert r["lr"] == best[(r["head"], r["arm"])], r
    finals = [(h, arm, lr) for h, arm, validation, lr in used if not validation]
    assert sorted(finals) == sorted((h, arm, lr) for (h, arm), lr in best.items() for _ in range(4))
    assert len(read_lines(out / "tuning.jsonl")) == 2 * 2 * 2 * 3


def test_experiment_resumes_only_unfinished_runs(experiment: Path, tmp_path: Path, calls):
    """A rerun redoes nothing; after interruptions it reruns exactly the unfinished runs, and
    the results are the same as those of the uninterrupted experiment."""
    out = tmp_path / "exp"
    shutil.copytree(experiment, out)
    before = read_lines(out / "results.jsonl")

    assert cli.main(["-q", *ARGS, "--out", str(out)]) == 0
    assert calls == {"finetune": [], "pretrain": [], "resumed": []}
    assert read_lines(out / "results.jsonl") == before

    runs = out / "runs"
    # Interrupted after its last checkpoint, before the summary.
    after_last = runs / "resnet50" / "3pc" / "pretrained" / "seed0"
    (after_last / "summary.json").unlink()
    # Interrupted between its step-2 and step-4 checkpoints (attention: dropout draws too).
    midway = runs / "attention" / "frac0.05" / "scratch" / "seed1"
    final = torch.load(midway / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
    (midway / "summary.json").unlink()
    (midway / "checkpoints" / "step_0000004.pt").unlink()
    # Interrupted before any checkpoint: only config.json (and perhaps metrics) remain.
    unsaved = runs / "resnet50" / "frac0.05" / "scratch" / "seed1"
    (unsaved / "summary.json").unlink()
    shutil.rmtree(unsaved / "checkpoints")
    assert (unsaved / "config.json").exists()

    assert cli.main(["-q", *ARGS, "--out", str(out)]) == 0
    assert sorted(calls["finetune"]) == sorted([after_last, midway, unsaved])
    assert sorted(calls["resumed"]) == sorted([after_last, midway])  # unsaved starts over
    assert calls["pretrain"] == []
    assert read_lines(out / "results.jsonl") == before
    for folder in (after_last, midway, unsaved):
        steps = [r["step"] for r in read_lines(folder / "metrics.jsonl")]
        assert steps == [2, 4], folder
    again = torch.load(midway / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=0, atol=1e-6)


def test_experiment_with_pretrained_skips_pretraining(
    experiment: Path, tmp_path: Path, capsys, calls
):
    """--pretrained reuses the given weights: nothing is pretrained, no pretrain/ folder."""
    out = tmp_path / "exp"
    weights = experiment / "pretrain"
    code, stdout, err = run_cli(
        [
            "experiment",
            "--preset",
            "tiny",
            "--labels",
            "3",
            "--seeds",
            "1",
            "--pretrained",
            str(weights),
            "--set",
            "finetune.steps=1",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert calls["pretrain"] == [] and len(calls["finetune"]) == 2
    assert not (out / "pretrain").exists()
    rows = read_lines(out / "results.jsonl")
    assert sorted(r["arm"] for r in rows) == ["pretrained", "scratch"]
    for r in rows:
        run = json.loads((out / r["run"] / "config.json").read_text())["run"]["finetune"]
        assert run["init"] == (str(weights) if r["arm"] == "pretrained" else None)
    assert "3/class" in stdout


def test_report_rerenders_from_results(experiment: Path, tmp_path: Path, capsys):
    """`selfie report` rebuilds table.md, table.csv and figure.png from the result files alone
    (results.jsonl; tuning.jsonl and experiment.json for the tuning and the paper's numbers)."""
    out = tmp_path / "exp"
    out.mkdir()
    for name in ("results.jsonl", "tuning.jsonl", "experiment.json"):
        if (experiment / name).exists():
            shutil.copy(experiment / name, out / name)
    code, stdout, err = run_cli(["report", str(out)], capsys)
    assert code == 0, err
    assert (out / "table.md").read_text() == (experiment / "table.md").read_text()
    assert (out / "table.csv").read_text() == (experiment / "table.csv").read_text()
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Table 2" in stdout and (out / "table.md").read_text() in stdout


def test_report_without_results_is_one_line_exit_2(tmp_path: Path, capsys):
    """`selfie report` on a folder with no results.jsonl: exit 2, one line, nothing written."""
    code, _, err = run_cli(["report", str(tmp_path)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfie: error:"), err
    assert "results" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_experiment_refuses_other_settings_in_same_folder(
    experiment: Path, tmp_path: Path, capsys, calls
):
    """An experiment folder belongs to one config: other --set values are refused, exit 2."""
    out = tmp_path / "exp"
    shutil.copytree(experiment, out, ignore=shutil.ignore_patterns("*.pt", "*.safetensors"))
    plan = (out / "experiment.json").read_text()
    code, _, err = run_cli([*ARGS, "--set", "finetune.lr=0.3", "--out", str(out)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "other settings" in lines[0], err
    assert calls == {"finetune": [], "pretrain": [], "resumed": []}
    assert (out / "experiment.json").read_text() == plan


def test_tune_visible_on_tiny_pretrains_once_per_p_and_chooses_by_validation(
    tmp_path: Path, capsys, calls
):
    """--tune-visible 0.75,0.5 with --unlabelled-dir: one pretraining per p on the pool, the
    pretrained arm finetuned from each on the 90/10 split, the final runs from the p of best
    validation accuracy (a tie to the p listed first); the table says which p and how many
    unlabelled and labelled images; a rerun redoes nothing."""
    from PIL import Image

    pool = tmp_path / "pool"
    for i in range(20):
        path = pool / ("", "more/")[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((40, 30 + i), 50 + 5 * i).convert("RGB").save(path)
    out = tmp_path / "exp"
    args = ["experiment", "--preset", "tiny", "--labels", "3", "--seeds", "1", "--out", str(out)]
    args += ["--tune-visible", "0.75,0.5", "--unlabelled-dir", str(pool)]
    args += ["--set", "pretrain.steps=2", "--set", "finetune.steps=2"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err

    for p in (0.75, 0.5):
        pre = out / "pretrain" / f"p{p:g}"
        assert (
            json.loads((pre / "config.json").read_text())["config"]["pretrain"]["visible_fraction"]
            == p
        )
        summary = json.loads((pre / "summary.json").read_text())
        assert summary["train_images"] == 20 and summary["unlabelled_dir"] == str(pool)
    tuning = read_lines(out / "tuning.jsonl")
    assert [(t["arm"], t["visible"], t["lr"]) for t in tuning] == [
        ("pretrained", 0.75, 0.05),  # the tiny preset's LR: --tune was not given
        ("pretrained", 0.5, 0.05),
    ]
    for t in tuning:
        tuned = json.loads(
            (
                out
                / "tune/resnet50/3pc/pretrained"
                / f"p{t['visible']:g}"
                / "lr0.05"
                / "summary.json"
            ).read_text()
        )
        assert tuned["validation"] is True and "test_acc" not in tuned
        assert tuned["val_acc"] == t["val_acc"] and tuned["init"].endswith(f"p{t['visible']:g}")
    best = max(t["val_acc"] for t in tuning)
    chosen = next(t["visible"] for t in tuning if t["val_acc"] == best)
    rows = {r["arm"]: r for r in read_lines(out / "results.jsonl")}
    assert rows["pretrained"]["visible"] == chosen and "visible" not in rows["scratch"]
    run = json.loads((out / rows["pretrained"]["run"] / "config.json").read_text())
    assert run["run"]["finetune"]["init"] == str(out / "pretrain" / f"p{chosen:g}")
    assert run["config"]["pretrain"]["visible_fraction"] == chosen
    assert (
        rows["pretrained"]["unlabelled_images"] == 20 and rows["scratch"]["unlabelled_images"] == 0
    )
    assert rows["pretrained"]["labelled_images"] == rows["scratch"]["labelled_images"] == 30

    table = (out / "table.md").read_text()
    assert f"| 20 / 30 (0.667x) | {chosen:g} |" in table and "p (chosen)" in stdout
    assert "## Peak-LR and p tuning" in table
    plan = json.loads((out / "experiment.json").read_text())["plan"]
    assert plan["tune_visible"] == [0.75, 0.5] and plan["unlabelled_dir"] == str(pool)

    assert len(calls["pretrain"]) == 2 and len(calls["finetune"]) == 4
    for seen in calls.values():
        seen.clear()
    code, _, err = run_cli(args, capsys)  # recorded: a rerun finds everything done
    assert code == 0, err
    assert calls == {"finetune": [], "pretrain": [], "resumed": []}


def test_p_and_lr_tuning_rule_and_subset_file_cells(tmp_path: Path, capsys, monkeypatch):
    """With val_acc given per (p, LR): the best pair wins, a tie goes to the p listed first,
    then to the smaller LR; the scratch arm tunes only its LR. A --subset-file cell is named
    after its file."""
    import selfie.experiment

    val_acc = {  # cell -> {(p, lr): val_acc}; p None for scratch
        "3pc": {(0.75, 0.02): 0.5, (0.75, 0.05): 0.6, (0.5, 0.02): 0.6, (0.5, 0.05): 0.4},
        "file-pick.txt": {(0.75, 0.02): 0.3, (0.75, 0.05): 0.2, (0.5, 0.02): 0.9, (0.5, 0.05): 0.9},
    }
    scratch = {0.02: 0.1, 0.05: 0.2}
    finals = []

    def fake_pretrain(config, opts):
        return {}

    def fake_finetune(config, spec, opts):
        cell = "3pc" if spec.subset_file is None else "file-pick.txt"
        p = config.pretrain.visible_fraction
        if spec.init is not None:
            assert spec.init.endswith(f"p{p:g}")  # the finetuned weights are p's
        if not spec.validation:
            finals.append((cell, spec.arm, None if spec.init is None else p, config.finetune.lr))
            return {"fraction": 0.1, "test_acc": 0.5, "train_images": 12}
        lr = config.finetune.lr
        score = scratch[lr] if spec.init is None else val_acc[cell][(p, lr)]
        return {"val_acc": score}

    monkeypatch.setattr(selfie.experiment, "pretrain", fake_pretrain)
    monkeypatch.setattr(selfie.experiment, "finetune", fake_finetune)
    # The digits have no file names; give the subset file's check some to match.
    monkeypatch.setattr(selfie.experiment, "train_names", lambda data, data_dir: ["a.png"])
    (tmp_path / "pick.txt").write_text("a.png\n")
    out = tmp_path / "exp"
    args = ["experiment", "--preset", "tiny", "--labels", "3", "--seeds", "1", "--tune"]
    args += ["--subset-file", str(tmp_path / "pick.txt"), "--tune-visible", "0.75,0.5"]
    code, _, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(finals) == sorted(
        [
            ("3pc", "pretrained", 0.75, 0.05),  # tie at 0.6 with (0.5, 0.02): the first p
            ("3pc", "scratch", None, 0.05),
            ("file-pick.txt", "pretrained", 0.5, 0.02),  # tie at 0.9: the smaller LR
            ("file-pick.txt", "scratch", None, 0.05),
        ]
    )
    tuning = read_lines(out / "tuning.jsonl")
    assert len(tuning) == 2 * (4 + 2)
    assert {t.get("visible") for t in tuning if t["arm"] == "scratch"} == {None}
    table = (out / "table.md").read_text()
    assert "| pick.txt (10%) |" in table and "| 3/class (10%) |" in table
    # The tuning table bolds each arm's choice, the same as the runs made.
    assert "| resnet50 | 3/class | pretrained | 0.75 | 50.0 | **60.0** |" in table
    assert "| resnet50 | 3/class | pretrained | 0.5 | 60.0 | 40.0 |" in table
    assert "| resnet50 | pick.txt | pretrained | 0.5 | **90.0** | 90.0 |" in table


def test_tune_visible_with_reused_weights_is_refused(tmp_path: Path, capsys, calls):
    args = ["experiment", "--preset", "tiny", "--labels", "3", "--out", str(tmp_path / "exp")]
    code, _, err = run_cli([*args, "--tune-visible", "0.75,0.5", "--pretrained", "w"], capsys)
    assert code == 2 and "--pretrained reuses weights" in err
    code, _, err = run_cli([*args, "--tune-visible", "0.75,1.5"], capsys)
    assert code == 2 and "fractions in (0, 1)" in err
    code, _, err = run_cli(args[:3] + args[5:], capsys)  # no --labels, no --subset-file
    assert code == 2 and "needs --labels or --subset-file" in err
    # A subset file is checked before any pretraining: the digits have no file names.
    (tmp_path / "pick.txt").write_text("0.png\n")
    code, _, err = run_cli([*args, "--subset-file", str(tmp_path / "pick.txt")], capsys)
    assert code == 2 and "the digits data has no file names" in err
    assert calls == {"finetune": [], "pretrain": [], "resumed": []}
    assert not (tmp_path / "exp").exists()


def test_experiment_refuses_another_p_grid_or_pool_in_the_same_folder(
    tmp_path: Path, capsys, calls
):
    out = tmp_path / "exp"
    out.mkdir()
    plan = {"labels": [3], "seeds": 1, "tune_visible": [0.75, 0.5], "unlabelled_dir": None}
    config = cli.get_preset("tiny").to_dict()
    (out / "experiment.json").write_text(json.dumps({"config": config, "plan": plan}))
    args = ["experiment", "--preset", "tiny", "--labels", "3", "--seeds", "1", "--out", str(out)]
    code, _, err = run_cli([*args, "--tune-visible", "0.75"], capsys)
    assert code == 2 and "made with --tune-visible [0.75, 0.5], not [0.75]" in err
    code, _, err = run_cli(
        [*args, "--tune-visible", "0.75,0.5", "--unlabelled-dir", str(tmp_path)], capsys
    )
    assert code == 2 and "made with --unlabelled-dir None" in err
    assert calls == {"finetune": [], "pretrain": [], "resumed": []}
