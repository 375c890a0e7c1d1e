"""Frozen-feature evaluation: weighted kNN against its definition, `selfie probe` above
chance, and the kNN monitor of pretraining (logged, drawn, and leaving training untouched)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from selfie.knn import knn_accuracy, knn_predict
from selfie.use.probe import probe
from tests.helpers import run_cli


def naive_knn(bank, bank_labels, queries, k, num_classes, t=0.07):
    """One query at a time, from the definition: cosine similarity to every bank vector,
    the k most similar vote for their class with weight exp(s / t)."""
    out = []
    for q in queries:
        sims = [float(q @ b) / (float(q.norm()) * float(b.norm())) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(bank_labels[i])] += math.exp(sims[i] / t)
        out.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(out)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_predict_matches_the_definition(k):
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_predict(bank, labels, queries * 3.0, k, 4)  # scale: cosine ignores it
    assert torch.equal(got, naive_knn(bank, labels, queries, min(k, 60), 4))


def test_knn_weighting_prefers_the_closer_class():
    """Two far neighbours of class 1 lose to one near neighbour of class 0 with T = 0.07
    (exp(1/0.07) > 2 exp(0.6/0.07)); unweighted majority voting would pick class 1."""
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    assert knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 3, 2).tolist() == [0]
    assert knn_accuracy(bank, labels, bank, labels, 1, 2) == 1.0


def test_probe_on_digits_beats_chance(tiny_runs, one_thread):
    """10 labelled digits per class, frozen P of a 6-step run: measured linear 0.86, kNN
    (k = 20) 0.64, k = 200 (all 100) 0.61, majority class 0.10, on Zen 4 kernels (AVX2: the
    same to 0.01); the margins keep half of that."""
    r = probe(tiny_runs.pretrain, "10", device="cpu")
    assert r.train_images == 100 and r.test_images == 360 and r.feature_dim == 32
    assert r.chance == pytest.approx(37 / 360)
    assert r.linear_acc > 0.5
    assert r.knn_acc[20] > 0.35 and r.knn_acc[200] > 0.3


def test_probe_cli_and_bad_input(tiny_runs, tmp_path: Path, capsys):
    out = tmp_path / "probe.json"
    code, stdout, err = run_cli(
        ["probe", str(tiny_runs.pretrain), "--labels", "5", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert "linear probe" in stdout and "k = 200" in stdout
    assert json.loads(out.read_text())["train_images"] == 50
    code, _, err = run_cli(["probe", str(tiny_runs.finetune)], capsys)
    assert code == 2 and "needs a pretraining run" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["probe", str(tiny_runs.pretrain), "--labels", "0.0"], capsys)
    assert code == 2 and "outside (0, 1]" in err


def test_monitor_logs_knn_acc_at_its_steps(tiny_runs):
    """eval_every=2 on the tiny run: knn_acc in the records of steps 2, 4 and 6, drawn as a
    third panel of pretext.png, and the last one in the summary."""
    records = [
        json.loads(x) for x in (tiny_runs.pretrain / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "knn_acc" in r] == [2, 4, 6]
    assert all(0.0 <= r["knn_acc"] <= 1.0 for r in records)
    summary = json.loads((tiny_runs.pretrain / "summary.json").read_text())
    assert summary["final_knn_acc"] == records[-1]["knn_acc"]
    from PIL import Image

    width, _ = Image.open(tiny_runs.pretrain / "pretext.png").size
    assert width == 1350  # three panels of 4.5 inches at 100 dpi (two: 900)


def test_monitor_leaves_training_and_resume_exact(tiny_runs, tmp_path: Path, capsys, one_thread):
    """The monitor draws no random numbers and trains nothing: the same run without it ends
    with bitwise the same weights and losses; stopped at step 3 and resumed, a run with it
    logs exactly the uninterrupted run's records, knn_acc included."""
    base = ["pretrain", "--preset", "tiny", "--device", "cpu"]
    off = tmp_path / "off"
    assert run_cli([*base, "--out", str(off), "--set", "pretrain.eval_every=0"], capsys)[0] == 0
    with_monitor = torch.load(
        tiny_runs.pretrain / "checkpoints" / "step_0000006.pt", weights_only=True
    )
    without = torch.load(off / "checkpoints" / "step_0000006.pt", weights_only=True)
    for key, value in with_monitor["model"].items():
        assert torch.equal(value, without["model"][key]), key
    assert torch.equal(with_monitor["rng_cpu"], without["rng_cpu"])
    full = [json.loads(x) for x in (tiny_runs.pretrain / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (off / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in full] == [r["loss"] for r in plain]
    assert not any("knn_acc" in r for r in plain)

    part = tmp_path / "part"
    assert run_cli([*base, "--out", str(part), "--set", "pretrain.eval_every=2"], capsys)[0] == 0
    (part / "checkpoints" / "step_0000006.pt").unlink()  # as if killed after step 3's save
    (part / "summary.json").unlink()
    assert run_cli(["pretrain", "--resume", "--out", str(part)], capsys)[0] == 0
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    drop = ("images_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in full
    ]


def test_eval_every_must_not_be_negative(capsys):
    code, _, err = run_cli(
        ["show-config", "--preset", "tiny", "--set", "pretrain.eval_every=-1"], capsys
    )
    assert code == 2 and "give 0 (no kNN monitor) or more" in err


def test_probe_refuses_unlabelled_images(tmp_path: Path):
    """A run pretrained on a folder without class sub-folders has nothing to probe with."""
    import numpy as np
    from PIL import Image

    from selfie.errors import UserError
    from tests.test_export import fake_pretrain_run

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(12):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    run = fake_pretrain_run(tmp_path / "pre", ["data.dataset='folder'"], str(images))
    with pytest.raises(UserError, match="have no labels"):
        probe(run, device="cpu")
