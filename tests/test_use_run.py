"""selfie.use.run: the one way to open a run folder, and the use commands' --help."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from selfie import cli
from selfie.errors import UserError
from selfie.use.run import open_trained


@pytest.mark.parametrize("command", ["predict", "embed", "export", "probe", "inspect"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"selfie {command} runs/" in out


def test_open_trained_kinds_and_weights(tiny_runs):
    pre = open_trained(tiny_runs.pretrain, "cpu")
    ft = open_trained(tiny_runs.finetune / "model.safetensors", "cpu")
    assert (pre.kind, pre.head, ft.kind, ft.head) == ("pretrain", None, "finetune", "resnet50")
    assert pre.classes == tuple(str(d) for d in range(10)) and not pre.model.training
    ckpt = open_trained(tiny_runs.finetune / "checkpoints" / "step_0000060.pt", "cpu")
    assert ckpt.path == tiny_runs.finetune
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, ft.model.state_dict()[k]), k


def test_old_run_without_data_facts_measures_them(tiny_runs, tmp_path: Path):
    """A run folder written before config.json recorded "data": the class names and the
    normalisation are measured on its training split, equal to what is recorded now."""
    old = tmp_path / "old"
    shutil.copytree(tiny_runs.pretrain, old)
    config = json.loads((old / "config.json").read_text())
    del config["run"]["data"]
    (old / "config.json").write_text(json.dumps(config))
    a, b = open_trained(old, "cpu"), open_trained(tiny_runs.pretrain, "cpu")
    assert a.classes == b.classes
    torch.testing.assert_close(a.mean, b.mean) and torch.testing.assert_close(a.std, b.std)


def test_open_trained_refusals(tiny_runs, tmp_path: Path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment.json").write_text("{}")
    with pytest.raises(UserError, match="is an experiment folder; pass one of its runs"):
        open_trained(tmp_path / "exp")
    # The finetuning run's weights given to the pretraining run's folder: strict keys.
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_runs.pretrain, mixed)
    shutil.copy(tiny_runs.finetune / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(UserError, match="does not fit the network of"):
        open_trained(mixed, "cpu")
    with pytest.raises(UserError, match="`selfie predict` needs a finetuning run"):
        open_trained(tiny_runs.pretrain, "cpu", expect="finetune", what="predict")


@pytest.mark.parametrize(
    "args",
    [
        ["predict"],
        ["embed", "--out", "f.npz"],
        ["export", "--format", "safetensors"],
        ["probe"],
        ["inspect", "--out", "f.png"],
    ],
)
def test_every_command_refuses_a_missing_run(tmp_path: Path, capsys, args):
    code = cli.main(["-q", args[0], str(tmp_path / "no-such-run"), *args[1:]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err, err


@pytest.mark.parametrize("command", ["predict", "embed", "inspect"])
def test_every_image_command_refuses_a_folder_without_images(tiny_runs, tmp_path, capsys, command):
    run = tiny_runs.finetune if command == "predict" else tiny_runs.pretrain
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    out = {"predict": "p.csv", "embed": "f.npz", "inspect": "f.png"}[command]
    args = [command, str(run), "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / out)]
    code = cli.main(["-q", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no images found" in err, err
    assert not (tmp_path / out).exists()
