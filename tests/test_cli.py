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
