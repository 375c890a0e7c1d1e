"""`selfie predict` on a folder of PNGs and on the digits test split, and its bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfie.data.augment import normalize
from selfie.data.digits import load_digits
from selfie.use.run import open_trained
from tests.helpers import run_cli


def write_digit_pngs(root: Path, count: int | None = None) -> torch.Tensor:
    """The digits test images as 32x32 PNGs in class folders root/<digit>/<i>.png, plus a
    corrupt file and a loose RGBA photo-sized image; returns the images, uint8 (N, 3, 32, 32)."""
    test = load_digits(train=False)
    n = len(test) if count is None else count
    for i in range(n):
        path = root / str(int(test.labels[i])) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(path)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG not really")
    rgba = np.random.default_rng(0).integers(0, 255, (300, 200, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "loose.png")
    return test.images[:n]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_folder_rows_probabilities_and_accuracy(tiny_runs, tmp_path: Path, capsys):
    """Every file is a row; probabilities sum to 1; the prediction is the arg-max of the
    model's own logits on the image; the accuracy over the class folders is the run's
    test_acc (the PNGs are the test digits, decoded losslessly); a bad file is an error row."""
    images = write_digit_pngs(tmp_path / "imgs")
    out = tmp_path / "preds.csv"
    code, stdout, err = run_cli(
        [
            "predict",
            str(tiny_runs.finetune),
            "--data-dir",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "100",
        ],
        capsys,
    )
    assert code == 0, err
    rows = read_csv(out)
    classes = [str(d) for d in range(10)]
    assert list(rows[0]) == ["path", "label", "prediction", *(f"p_{c}" for c in classes), "error"]
    assert len(rows) == len(images) + 2
    broken = [r for r in rows if r["error"]]
    assert [r["path"] for r in broken] == [str(Path("3") / "broken.png")]
    assert broken[0]["prediction"] == "" and broken[0]["p_0"] == ""
    good = [r for r in rows if not r["error"]]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in good])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r["prediction"] for r in good] == [classes[k] for k in probs.argmax(1)]

    run = open_trained(tiny_runs.finetune, "cpu")
    with torch.no_grad():
        logits = run.model(normalize(images, run.mean, run.std))
    by_index = {int(Path(r["path"]).stem): r for r in good if r["path"] != "loose.png"}
    assert len(by_index) == len(images)
    mine = [classes[k] for k in logits.argmax(1).tolist()]
    assert [by_index[i]["prediction"] for i in range(len(images))] == mine
    p = torch.softmax(logits, 1).numpy()
    got = np.array([[float(by_index[i][f"p_{c}"]) for c in classes] for i in range(len(images))])
    np.testing.assert_allclose(got, p, atol=2e-6)

    test_acc = json.loads((tiny_runs.finetune / "summary.json").read_text())["test_acc"]
    assert test_acc > 0.4  # finetuning learned: chance is 0.10, measured 0.69
    labelled = [r for r in good if r["label"]]
    acc = np.mean([r["label"] == r["prediction"] for r in labelled])
    assert len(labelled) == len(images) and acc == pytest.approx(test_acc, abs=1e-12)
    assert next(r for r in good if r["path"] == "loose.png")["label"] == ""
    assert f"accuracy {test_acc:.4f} on the {len(images)} images" in stdout


def test_predict_test_split_matches_summary(tiny_runs, tmp_path: Path, capsys):
    """Without --data-dir: the run's own test split, rows by index, its test_acc again."""
    out = tmp_path / "split.csv"
    code, stdout, err = run_cli(
        [
            "predict",
            str(tiny_runs.finetune / "model.safetensors"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    rows = read_csv(out)
    assert [r["index"] for r in rows] == [str(i) for i in range(360)]
    acc = np.mean([r["label"] == r["prediction"] for r in rows])
    summary = json.loads((tiny_runs.finetune / "summary.json").read_text())
    assert acc == pytest.approx(summary["test_acc"], abs=1e-12)
    assert "the digits test split" in stdout


@pytest.mark.parametrize(
    ("which", "extra", "needle"),
    [
        ("pretrain", [], "is a pretrain run; `selfie predict` needs a finetuning run"),
        ("missing", [], "does not exist"),
        ("notarun", [], "holds no config.json"),
        ("finetune", ["--data-dir", "MISSING"], "does not exist or is not a folder"),
        ("finetune", ["--data-dir", "EMPTY"], "no images found under"),
        ("finetune", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_predict_bad_input_one_line_exit_2(tiny_runs, tmp_path: Path, capsys, which, extra, needle):
    runs = {
        "pretrain": tiny_runs.pretrain,
        "finetune": tiny_runs.finetune,
        "missing": tmp_path / "nothing",
        "notarun": tmp_path,
    }
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("no images here")
    extra = [str(tmp_path / e) if e in ("MISSING", "EMPTY") else e for e in extra]
    out = tmp_path / "p.csv"
    code, _, err = run_cli(["predict", str(runs[which]), "--out", str(out), *extra], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_predict_streamed_dataset_uses_its_evaluation_crop(tmp_path: Path, capsys, one_thread):
    """A run on a class-folder tree (paper-imagenet224 with a tiny network): predict on its
    val split (rows by path) reproduces its test_acc, and the same files given as a folder
    get the same probabilities: both decode with the evaluation crop finetuning used."""
    from tests.helpers import write_fake_imagenet
    from tests.test_stream import cli_args

    tree = write_fake_imagenet(tmp_path / "tree")
    ft = tmp_path / "ft"
    args = [*cli_args("finetune", tree, ft, 3, 32, 16), "--labels", "5", "--scratch"]
    code, _, err = run_cli([*args, "--workers", "0"], capsys)
    assert code == 0, err
    split, folder = tmp_path / "split.csv", tmp_path / "folder.csv"
    assert run_cli(["predict", str(ft), "--out", str(split)], capsys)[0] == 0
    code, _, err = run_cli(
        ["predict", str(ft), "--data-dir", str(tree / "val"), "--out", str(folder)], capsys
    )
    assert code == 0, err
    a, b = read_csv(split), read_csv(folder)
    assert (
        [r["path"] for r in a]
        == [r["path"] for r in b]
        == [str(Path(c) / f"{c}_{i}.JPEG") for c in ("ant", "bee", "cat") for i in range(2)]
    )
    assert [r["p_ant"] for r in a] == [r["p_ant"] for r in b]
    test_acc = json.loads((ft / "summary.json").read_text())["test_acc"]
    assert np.mean([r["label"] == r["prediction"] for r in a]) == pytest.approx(test_acc)
