"""`selfie export`: safetensors in selfie's layout load back strictly; timm's layout is
timm's resnetv2_50 key list exactly; the ONNX file runs in onnxruntime as PyTorch does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from selfie.checkpoint import export_safetensors
from selfie.config import apply_overrides, get_preset
from selfie.data.augment import normalize
from selfie.data.digits import load_digits
from selfie.models.classifier import build_classifier
from selfie.models.resnet_v2 import ResNetV2
from selfie.models.selfie import Selfie
from selfie.use.export import timm_keys, to_timm
from selfie.use.run import open_trained
from tests.helpers import run_cli


def test_safetensors_pretrain_backbone_loads_back_strictly(tiny_runs, tmp_path: Path, capsys):
    """P alone: the state dict of ResNetV2(num_stages=3), every key, nothing else; loaded
    with strict=True it gives the run's features; the metadata carries the normalisation."""
    out = tmp_path / "p.safetensors"
    code, stdout, err = run_cli(
        ["export", str(tiny_runs.pretrain), "--format", "safetensors", "--out", str(out)], capsys
    )
    assert code == 0, err
    run = open_trained(tiny_runs.pretrain, "cpu")
    net = ResNetV2(run.config.model, num_stages=3)
    net.load_state_dict(load_file(str(out)), strict=True)
    net.eval()
    x = normalize(load_digits(train=False).images[:16], run.mean, run.std)
    with torch.no_grad():
        # Not bitwise: the run's network is channels_last, this one contiguous.
        torch.testing.assert_close(net(x), run.model.patch_net(x), rtol=0, atol=1e-5)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "pretrain" and meta["layout"] == "selfie"
    assert json.loads(meta["mean"]) == pytest.approx(run.mean.tolist())
    assert json.loads(meta["classes"]) == [str(d) for d in range(10)]
    assert "backbone P" in stdout


def test_safetensors_classifier_loads_back_strictly(tiny_runs, tmp_path: Path, capsys):
    code, _, err = run_cli(["export", str(tiny_runs.finetune), "--format", "safetensors"], capsys)
    assert code == 0, err
    out = tiny_runs.finetune / "classifier.safetensors"
    run = open_trained(tiny_runs.finetune, "cpu")
    net = build_classifier(run.config, "resnet50")
    net.load_state_dict(load_file(str(out)), strict=True)
    for k, v in run.model.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k


def test_timm_layout_is_timms_resnetv2_50_key_list():
    """The paper's ResNet-50 v2 (ImageNet stem, 1000 classes), mapped: every key of timm's
    resnetv2_50 (written down from timm's source) exactly once, each with its shape."""
    config = get_preset("paper-imagenet224")
    with torch.device("meta"):
        net = ResNetV2(config.model, num_stages=4, num_classes=1000)
    state = net.state_dict()
    mapped = to_timm(state)
    expected = timm_keys()
    assert len(expected) == 300 and len(mapped) == len(state)  # no two keys on one name
    assert set(mapped) == set(expected)
    for key, shape in expected.items():
        assert tuple(mapped[key].shape) == shape, key


def fake_pretrain_run(folder: Path, overrides: list[str], data_dir: str | None = None) -> Path:
    """A run folder as `selfie pretrain` leaves it, with untrained weights (no training)."""
    config = apply_overrides(get_preset("tiny"), overrides)
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    export_safetensors(Selfie(config), folder / "model.safetensors")
    facts = {"classes": [str(d) for d in range(10)], "mean": [0.2] * 3, "std": [0.3] * 3}
    run = {"data_dir": data_dir, "data": facts}
    (folder / "config.json").write_text(json.dumps({"config": config.to_dict(), "run": run}))
    return folder


def test_timm_layout_of_a_bottleneck_pretraining_run(tmp_path: Path, capsys):
    """P of a bottleneck network: timm's names for the stem and stages 0-2 (P's final norm,
    of P's width, left out); shapes as the network's own."""
    # A stem narrower than stage 1, as in ResNet-50 (64 -> 256), so that stage 1's first
    # unit projects its shortcut as timm's always does.
    overrides = ["model.block='bottleneck'", "model.stem='imagenet'", "model.stem_width=4"]
    run_dir = fake_pretrain_run(tmp_path / "pre", overrides)
    code, _, err = run_cli(
        ["export", str(run_dir), "--format", "safetensors", "--layout", "timm"], capsys
    )
    assert code == 0, err
    got = load_file(str(run_dir / "backbone-timm.safetensors"))
    names = set(timm_keys())
    assert set(got) <= names
    wanted = {k for k in names if k.startswith(("stem.", "stages.0.", "stages.1.", "stages.2."))}
    wanted = {k for k in wanted if ".blocks.0." in k or k.startswith("stem.")}  # 1 unit/stage
    assert set(got) == wanted
    p = Selfie(apply_overrides(get_preset("tiny"), overrides)).patch_net
    assert got["stem.conv.weight"].shape == p.stem[0].weight.shape
    assert torch.equal(
        got["stages.1.blocks.0.downsample.conv.weight"],
        load_file(str(run_dir / "model.safetensors"))["patch_net.stages.1.0.shortcut.weight"],
    )


def _onnx_matches(path: Path, net: torch.nn.Module, x: torch.Tensor) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = net(x).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_onnx_round_trip_in_onnxruntime(tiny_runs, tmp_path: Path, capsys, kind):
    """The ONNX file in onnxruntime gives PyTorch's outputs to 1e-4, at batch sizes other
    than the export's example (the batch dimension is dynamic); measured max |diff| ~1e-6."""
    folder = tiny_runs.pretrain if kind == "pretrain" else tiny_runs.finetune
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(["export", str(folder), "--format", "onnx", "--out", str(out)], capsys)
    assert code == 0, err
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["kind"] == kind and json.loads(meta["classes"])[0] == "0"
    run = open_trained(folder, "cpu")
    net = run.backbone() if kind == "pretrain" else run.model
    images = load_digits(train=False).images
    for batch in (1, 7):
        x = normalize(images[:batch], run.mean, run.std).contiguous()
        assert _onnx_matches(out, net, x) < 1e-4


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--format", "safetensors", "--layout", "timm"], "needs a bottleneck ResNet v2"),
        (["--format", "onnx", "--layout", "timm"], "--layout applies to safetensors"),
        (["--format", "tflite"], "invalid choice"),
    ],
)
def test_export_bad_input(tiny_runs, tmp_path: Path, capsys, args, needle):
    code, _, err = run_cli(
        ["export", str(tiny_runs.pretrain), *args, "--out", str(tmp_path / "x")], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "x").exists()


def test_onnx_attention_head_round_trip(tmp_path: Path, capsys):
    """The attention head (P's trunk, A's transformer blocks, the head) exports too; its
    blocks run in onnxruntime as in PyTorch's eval mode (measured max |diff| 1.8e-7)."""
    from selfie.models.classifier import build_classifier

    config = get_preset("tiny")
    torch.manual_seed(0)
    folder = tmp_path / "ft"
    folder.mkdir()
    export_safetensors(build_classifier(config, "attention"), folder / "model.safetensors")
    facts = {"classes": [str(d) for d in range(10)], "mean": [0.2] * 3, "std": [0.3] * 3}
    spec = {"labels": 5, "head": "attention", "init": None, "validation": False}
    run_section = {"data_dir": None, "data": facts, "finetune": spec}
    (folder / "config.json").write_text(
        json.dumps({"config": config.to_dict(), "run": run_section})
    )
    out = tmp_path / "a.onnx"
    code, stdout, err = run_cli(
        ["export", str(folder), "--format", "onnx", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert "head attention" in stdout
    run = open_trained(folder, "cpu")
    x = normalize(load_digits(train=False).images[:5], run.mean, run.std).contiguous()
    assert _onnx_matches(out, run.model, x) < 1e-4
