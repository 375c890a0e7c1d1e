"""`selfie embed`: shapes, paths, labels, and that the features are the network's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfie.data.augment import normalize
from selfie.data.digits import load_digits
from selfie.models.resnet_v2 import ResNetV2
from selfie.use.run import open_trained
from tests.helpers import run_cli
from tests.test_predict import write_digit_pngs


def test_embed_folder_is_p_on_whole_images(tiny_runs, tmp_path: Path, capsys):
    """A pretraining run: P's pooled features (stem, stages 1-3, BN-ReLU, mean) of each
    decoded image, in file order, labels from the class folders, the bad file listed."""
    images = write_digit_pngs(tmp_path / "imgs", count=40)
    out = tmp_path / "f.npz"
    args = ["embed", str(tiny_runs.pretrain), "--data-dir", str(tmp_path / "imgs")]
    code, stdout, err = run_cli([*args, "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    z = np.load(out)
    assert set(z.files) == {"features", "paths", "labels", "classes", "failed", "failed_why"}
    run = open_trained(tiny_runs.pretrain, "cpu")
    assert isinstance(run.backbone(), ResNetV2)
    d = run.config.model.widths[2]
    assert z["features"].shape == (41, d) and z["features"].dtype == np.float32
    assert list(z["failed"]) == [str(Path("3") / "broken.png")]
    paths = list(z["paths"])
    assert paths[-1] == "loose.png" and z["labels"][-1] == -1
    index = [int(Path(p).stem) for p in paths[:-1]]
    assert sorted(index) == list(range(40))
    test = load_digits(train=False)
    assert z["labels"][:-1].tolist() == test.labels[index].tolist()
    with torch.no_grad():
        x = normalize(images[index], run.mean, run.std)
        mine = run.model.patch_net(x)  # (B, D) P on the whole image
        by_hand = torch.relu(run.model.patch_net.norm(run.model.patch_net.forward_features(x)))
    torch.testing.assert_close(torch.from_numpy(z["features"][:-1]), mine, rtol=0, atol=1e-5)
    torch.testing.assert_close(mine, by_hand.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    assert f"features 41 x {d}" in stdout


def test_embed_finetuned_trunk_is_classifier_input(tiny_runs, tmp_path: Path, capsys):
    """A finetuning run, on its test split: the features its linear head reads, so the
    head applied to them gives the run's logits."""
    out = tmp_path / "ft.npz"
    code, _, err = run_cli(
        ["embed", str(tiny_runs.finetune), "--out", str(out), "--device", "cpu"], capsys
    )
    assert code == 0, err
    z = np.load(out)
    assert z["features"].shape == (360, 64)
    assert list(z["paths"]) == [str(i) for i in range(360)]
    run = open_trained(tiny_runs.finetune, "cpu")
    test = load_digits(train=False)
    with torch.no_grad():
        logits = run.model(normalize(test.images, run.mean, run.std))
        again = run.model.head(torch.from_numpy(z["features"]))
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-4)
    assert z["labels"].tolist() == test.labels.tolist()


@pytest.mark.parametrize(
    ("out_name", "needle"), [("f.txt", "ending in .npz"), ("f.npz", "no images found")]
)
def test_embed_bad_input(tiny_runs, tmp_path: Path, capsys, out_name, needle):
    (tmp_path / "empty").mkdir()
    args = ["embed", str(tiny_runs.pretrain), "--data-dir", str(tmp_path / "empty")]
    code, _, err = run_cli([*args, "--out", str(tmp_path / out_name)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
