"""The CLI in-process: pretrain, show-config, presets, quickstart files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfie.checkpoint import list_checkpoints
from tests.helpers import run_cli


def test_presets_lists_every_preset(capsys):
    """`selfie presets` names each preset with a description."""
    code, out, _ = run_cli(["presets"], capsys)
    assert code == 0
    for name in (
        "paper-cifar10",
        "paper-imagenet32",
        "paper-imagenet224",
        "cifar10-cpu",
        "digits",
        "tiny",
    ):
        assert name in out


def test_show_config_paper_size(capsys):
    """show-config resolves the paper preset: its values and about 25M parameters."""
    code, out, _ = run_cli(["show-config", "--preset", "paper-cifar10"], capsys)
    assert code == 0
    shown = json.loads(out)
    assert shown["config"]["pretrain"]["batch_size"] == 512
    assert shown["config"]["model"]["attn_heads"] == 32
    assert 24.5e6 < shown["parameters"]["selfie_total"] < 25.5e6
    assert 23.4e6 < shown["parameters"]["finetune_resnet"] < 23.6e6
    # the Table 2 variant (P's trunk + A + a linear layer) is about as large at paper size
    assert 25.0e6 < shown["parameters"]["finetune_attention"] < 25.2e6


def test_show_config_applies_set(capsys):
    code, out, _ = run_cli(["show-config", "--preset", "tiny", "--set", "pretrain.lr=0.2"], capsys)
    assert code == 0
    assert json.loads(out)["config"]["pretrain"]["lr"] == 0.2


def test_pretrain_writes_run_folder(tmp_path: Path, capsys):
    """A short tiny run writes config, metrics, checkpoints (weights_only), summary, plot."""
    out_dir = tmp_path / "run"
    code, _, err = run_cli(
        ["pretrain", "--preset", "tiny", "--out", str(out_dir), "--steps", "4"], capsys
    )
    assert code == 0, err
    config = json.loads((out_dir / "config.json").read_text())
    assert config["config"]["pretrain"]["steps"] == 4
    assert "torch" in config["versions"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("step", "loss", "pretext_acc", "lr", "images_per_s"):
        assert key in records[0]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["chance_pretext_acc"] == 0.25
    assert 0.0 <= summary["heldout_pretext_acc"] <= 1.0
    ckpts = list_checkpoints(out_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000003.pt", "step_0000004.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["step"] == 4 and state["kind"] == "pretrain"
    assert (out_dir / "pretext.png").stat().st_size > 1000
    assert (out_dir / "model.safetensors").exists()


def test_resume_continues_at_right_step_and_lr(tmp_path: Path, capsys):
    """A run stopped at step 3 and resumed equals the uninterrupted run, LR included."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(["pretrain", "--preset", "tiny", "--out", str(full)], capsys)[0] == 0
    assert (
        run_cli(
            [
                "pretrain",
                "--preset",
                "tiny",
                "--out",
                str(part),
                "--steps",
                "6",
                "--set",
                "pretrain.checkpoint_every=3",
            ],
            capsys,
        )[0]
        == 0
    )
    # Simulate a crash after step 3: drop the later checkpoint and the summary.
    (part / "checkpoints" / "step_0000006.pt").unlink()
    (part / "summary.json").unlink()
    code, _, err = run_cli(["pretrain", "--resume", "--out", str(part)], capsys)
    assert code == 0, err
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [2, 4, 6]
    for ra, rb in zip(a, b, strict=True):
        assert ra["lr"] == rb["lr"]
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    wa = torch.load(full / "checkpoints" / "step_0000006.pt", weights_only=True)["model"]
    wb = torch.load(part / "checkpoints" / "step_0000006.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["pretrain", "--preset", "nope"], "unknown preset 'nope'"),
        (["pretrain", "--preset", "tiny", "--set", "pretrain.lrr=0.1"], "unknown key"),
        (["pretrain", "--preset", "tiny", "--set", "pretrain.lr=fast"], "expected a value"),
        (["pretrain", "--preset", "tiny", "--set", "data.patch_size=5"], "does not divide"),
        (["pretrain", "--preset", "cifar10-cpu", "--data-dir", "/nonexistent/cifar"], "--download"),
        (["pretrain", "--preset", "tiny", "--batch-size", "99999"], "lower --batch-size"),
        (["show-config", "--preset", "tiny", "--set", "nonsense"], "unknown key"),
        (["pretrain", "--resume"], "--resume needs --out"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys, args, needle):
    """Bad input: exit code 2, one line on stderr naming the problem, no traceback."""
    code, _, err = run_cli(
        [
            *args,
            *(
                ["--out", str(tmp_path / "r")]
                if "--out" not in args and args[0] == "pretrain" and "--resume" not in args
                else []
            ),
        ],
        capsys,
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("selfie: error:") and needle in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_existing_run_is_not_overwritten(tmp_path: Path, capsys):
    out_dir = tmp_path / "run"
    assert (
        run_cli(["pretrain", "--preset", "tiny", "--out", str(out_dir), "--steps", "2"], capsys)[0]
        == 0
    )
    code, _, err = run_cli(["pretrain", "--preset", "tiny", "--out", str(out_dir)], capsys)
    assert code == 2 and "already holds a run" in err


def test_unwritable_out_folder_is_one_line_exit_2(tmp_path: Path, capsys):
    """An --out that cannot be created (its parent is a file; root ignores chmod) exits 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(
        ["pretrain", "--preset", "tiny", "--out", str(blocker / "run"), "--steps", "2"], capsys
    )
    assert code == 2
    assert err.count("\n") == 1 and "cannot write to" in err and "choose another --out" in err


@pytest.mark.parametrize(
    "command",
    [
        ["pretrain", "--preset", "tiny"],
        ["finetune", "--preset", "tiny", "--labels", "5", "--scratch"],
        ["experiment", "--preset", "tiny", "--labels", "5", "--seeds", "1"],
    ],
)
def test_data_dir_with_the_builtin_digits_is_refused(tmp_path: Path, capsys, command):
    """The digits read no folder: a --data-dir (a user's photos, say) is a one-line error that
    names --dataset folder, not a run that silently trains on digits."""
    photos, out = tmp_path / "photos", tmp_path / "run"
    photos.mkdir()
    code, _, err = run_cli([*command, "--data-dir", str(photos), "--out", str(out)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "built-in digits" in err and "--dataset folder" in err
    assert not out.exists()


def test_data_check_refuses_a_data_dir_for_the_digits(tmp_path: Path, capsys):
    code, _, err = run_cli(["data", "check", "--dataset", "digits", "--data-dir", "x"], capsys)
    assert code == 2 and "--dataset folder" in err


def _write_two_class_folder(root: Path) -> Path:
    from PIL import Image

    for c, name in enumerate(("cat", "dog")):
        for i in range(10):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (c * 200, i * 20, 50)).save(path)
    return root


def test_dataset_flag_chooses_the_data_like_set(tmp_path: Path, capsys):
    """--dataset NAME on pretrain and finetune is --set data.dataset=NAME: the tiny preset
    trains on a folder of images (10 per class; every 10th held out, so 18 train)."""
    photos = _write_two_class_folder(tmp_path / "photos")
    flag = run_cli(["show-config", "--preset", "tiny", "--dataset", "folder"], capsys)[1]
    via_set = run_cli(["show-config", "--preset", "tiny", "--set", "data.dataset=folder"], capsys)
    assert json.loads(flag) == json.loads(via_set[1])
    assert json.loads(flag)["config"]["data"]["dataset"] == "folder"

    out = tmp_path / "pre"
    common = ["--preset", "tiny", "--dataset", "folder", "--data-dir", str(photos)]
    code, _, err = run_cli(["pretrain", *common, "--out", str(out), "--steps", "2"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["config"]["data"]["dataset"] == "folder"
    assert json.loads((out / "summary.json").read_text())["train_images"] == 18

    tuned = tmp_path / "fine"
    args = ["finetune", *common, "--set", "data.num_classes=2", "--labels", "4", "--init"]
    args += [str(out), "--out", str(tuned), "--steps", "2"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["train_images"] == 8 and summary["test_images"] == 2


def test_workers_is_for_streamed_data(tmp_path: Path, capsys, caplog):
    """--workers on an in-memory dataset warns that it does nothing there (the run goes on);
    a negative count is a one-line error."""
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--steps", "2", "--workers", "2", "--out", str(out)]
    with caplog.at_level("WARNING", logger="selfie.data.source"):
        code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert any("held in memory" in r.getMessage() for r in caplog.records)
    code, _, err = run_cli([*args[:-1], str(tmp_path / "neg"), "--workers", "-1"], capsys)
    assert code == 2 and "--workers -1" in err and not (tmp_path / "neg").exists()
