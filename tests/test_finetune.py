"""Finetuning: exact weight transfer from P (and A), the test split's single late use, the
fixed labelled subset, and the `selfie finetune` command end to end on the tiny preset."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from selfie import cli
from selfie.checkpoint import list_checkpoints
from selfie.config import Config, apply_overrides, get_preset
from selfie.data.digits import load_digits
from selfie.errors import UserError
from selfie.finetune import FinetuneSpec, finetune
from selfie.models.classifier import _load_exact, build_classifier, transfer_pretrained
from selfie.models.selfie import Selfie
from selfie.runfolder import RunOptions
from tests.helpers import run_cli

P_PREFIXES = ("stem.", "stages.0.", "stages.1.", "stages.2.")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*overrides: str) -> Config:
    return apply_overrides(get_preset("tiny"), list(overrides))


def pretrained_selfie(config: Config, seed: int = 1) -> Selfie:
    """A Selfie whose BN affine parameters and running statistics are not the defaults, so a
    transfer that dropped them, or evaluated with other statistics, would be visible."""
    torch.manual_seed(seed)
    model = Selfie(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- transfer -------------------------------------------------------------------------------


def test_transfer_resnet50_loads_exactly_stem_and_stages_1_to_3():
    """resnet50 head: stem and stages 1-3 become P's tensors; stage 4, norm and head stay."""
    config = tiny()
    selfie = pretrained_selfie(config)
    source = selfie.state_dict()
    torch.manual_seed(2)
    model = build_classifier(config, "resnet50")
    before = clone_state(model)
    transfer_pretrained(model, "resnet50", source, "test")
    after = model.state_dict()

    transferred = {k for k in after if k.startswith(P_PREFIXES)}
    kept = {k for k in after if k.startswith(("stages.3.", "norm.", "head."))}
    assert transferred | kept == set(after) and not transferred & kept
    p_keys = {
        k.removeprefix("patch_net.")
        for k in source
        if k.startswith(("patch_net.stem.", "patch_net.stages."))
    }
    assert transferred == p_keys
    for k in transferred:
        assert torch.equal(after[k], source[f"patch_net.{k}"]), k
    for k in kept:
        assert torch.equal(after[k], before[k]), k
    # The transfer did something: the two initialisations differed before it.
    assert not torch.equal(before["stem.0.weight"], source["patch_net.stem.0.weight"])


def test_transfer_attention_loads_everything_but_the_head():
    """attention head: P, A and the positions are the Selfie's; only head.* stays fresh."""
    config = tiny()
    selfie = pretrained_selfie(config)
    source = selfie.state_dict()
    torch.manual_seed(2)
    model = build_classifier(config, "attention")
    before = clone_state(model)
    transfer_pretrained(model, "attention", source, "test")
    after = model.state_dict()

    head = {k for k in after if k.startswith("head.")}
    assert head == {"head.weight", "head.bias"}
    assert set(after) - head == set(source)
    for k in set(after) - head:
        assert torch.equal(after[k], source[k]), k
    for k in head:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(before["pool.u0"], source["pool.u0"])


@pytest.mark.parametrize("head", ["resnet50", "attention"])
@pytest.mark.parametrize(
    ("make_source", "needle"),
    [
        # Another P: wider stage 3 (shapes differ) or two units in stage 1 (unexpected keys).
        (lambda: Selfie(tiny("model.widths=(8,16,48,64)")).state_dict(), "stages.2.0."),
        (lambda: Selfie(tiny("model.layers=(2,1,1,1)")).state_dict(), "stages.0.1."),
        # One key too many.
        (
            lambda: {
                **Selfie(tiny()).state_dict(),
                "patch_net.stages.0.0.extra": torch.zeros(1),
            },
            "stages.0.0.extra",
        ),
        # Not a Selfie at all.
        (lambda: {"encoder.weight": torch.zeros(3)}, "patch_net."),
    ],
    ids=["wider", "deeper", "extra-key", "no-patch-net"],
)
def test_transfer_refuses_other_architectures(head, make_source, needle):
    """A state dict of another architecture is a UserError naming the offending keys."""
    model = build_classifier(tiny(), head)
    with pytest.raises(UserError, match=r"another architecture|no Selfie") as info:
        transfer_pretrained(model, head, make_source(), "ckpt.pt")
    assert needle in str(info.value) and "ckpt.pt" in str(info.value)


def test_load_exact_refuses_a_missing_key():
    """A source lacking a tensor the transfer should fill is refused, naming that key."""
    config = tiny()
    model = build_classifier(config, "resnet50")
    source = {
        k.removeprefix("patch_net."): v
        for k, v in Selfie(config).state_dict().items()
        if k.startswith(("patch_net.stem.", "patch_net.stages."))
    }
    del source["stages.1.0.conv2.weight"]
    fresh = {k for k in model.state_dict() if k.startswith(("stages.3.", "norm.", "head."))}
    with pytest.raises(UserError, match=r"stages\.1\.0\.conv2\.weight"):
        _load_exact(model, source, fresh, "ckpt")


# --- equivalence after transfer -------------------------------------------------------------


def test_resnet50_after_transfer_reproduces_p_features():
    """After transfer, in eval mode, ResNet-50's stem + stages 1-3 compute P's feature map."""
    config = tiny()
    selfie = pretrained_selfie(config).eval()
    torch.manual_seed(3)
    model = build_classifier(config, "resnet50").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = selfie.patch_net.forward_features(x, 3)
        assert not torch.allclose(model.forward_features(x, 3), want, atol=1e-3)
        transfer_pretrained(model, "resnet50", selfie.state_dict(), "test")
        got = model.forward_features(x, 3)
    assert got.shape == want.shape == (4, 32, 8, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_attention_classifier_eval_is_deterministic_and_positions_upsample():
    """Eval-mode logits repeat exactly (dropout off); each 8x8 map cell takes the position
    of the 4x4 patch-grid cell it lies in."""
    config = tiny()
    selfie = pretrained_selfie(config)
    model = build_classifier(config, "attention")
    transfer_pretrained(model, "attention", selfie.state_dict(), "test")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        noisy = model(x)
        assert not torch.equal(noisy, model(x))  # dropout is on in training
        model.eval()
        a, b = model(x), model(x)
        assert a.shape == (3, config.data.num_classes)
        assert torch.equal(a, b)

        table = model.position()
        assert torch.equal(table, selfie.position())
        grid = model.map_positions(8, 8)
    assert grid.shape == (64, table.shape[1])
    for i in range(8):
        for j in range(8):
            assert torch.equal(grid[i * 8 + j], table[(i // 2) * 4 + j // 2]), (i, j)


# --- the test split -------------------------------------------------------------------------


@pytest.fixture
def split_log(monkeypatch):
    """Record every dataset load of finetune.py as (split, whether training had finished)."""
    import selfie.engine
    import selfie.finetune

    calls: list[tuple[str, bool]] = []
    state = {"trained": False}
    real_load, real_run = selfie.finetune.open_source, selfie.engine.TrainLoop.run_steps

    def load(data, split, *args, **kwargs):
        calls.append((split, state["trained"]))
        return real_load(data, split, *args, **kwargs)

    def run_steps(self, *args, **kwargs):
        result = real_run(self, *args, **kwargs)
        state["trained"] = True
        return result

    monkeypatch.setattr(selfie.finetune, "open_source", load)
    monkeypatch.setattr(selfie.engine.TrainLoop, "run_steps", run_steps)
    return calls


def test_test_split_is_loaded_once_after_training(tmp_path: Path, split_log):
    """A final run reads the test split exactly once, and only after training has finished."""
    summary = finetune(
        tiny("finetune.steps=2"), FinetuneSpec(3), RunOptions(out=tmp_path, progress=False)
    )
    assert [split for split, _ in split_log].count("test") == 1
    assert ("test", True) in split_log
    assert all(trained for split, trained in split_log if split == "test")
    assert split_log[0] == ("train", False)
    assert 0.0 <= summary["test_acc"] <= 1.0


def test_validation_run_never_loads_test(tmp_path: Path, split_log):
    """A tuning run (validation=True) never reads the test split; it reports val_acc only."""
    summary = finetune(
        tiny("finetune.steps=2"),
        FinetuneSpec(3, validation=True),
        RunOptions(out=tmp_path, progress=False),
    )
    assert split_log and all(split != "test" for split, _ in split_log)
    assert 0.0 <= summary["val_acc"] <= 1.0
    assert "test_acc" not in summary
    assert summary["val_images"] == 10 and summary["train_images"] == 20


# --- the labelled subset --------------------------------------------------------------------


def test_subset_is_balanced_fixed_across_seeds_and_disjoint_from_val(tmp_path: Path, capsys):
    """subset.json holds 3 images per class, the same for every --seed; val is held out of it."""
    base = ["finetune", "--preset", "tiny", "--labels", "3", "--scratch"]
    base += ["--set", "finetune.steps=1"]
    subsets = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        code, _, err = run_cli([*base, "--seed", str(seed), "--out", str(out)], capsys)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["config"]["finetune"]["seed"] == seed
        subsets[seed] = json.loads((out / "subset.json").read_text())
    train = subsets[0]["train"]
    assert subsets[1]["train"] == train and subsets[0]["val"] == []
    assert len(train) == len(set(train)) == 30
    labels = load_digits(train=True).labels
    assert torch.bincount(labels[train], minlength=10).tolist() == [3] * 10

    out = tmp_path / "val"
    code, _, err = run_cli([*base, "--validation", "--out", str(out)], capsys)
    assert code == 0, err
    split = json.loads((out / "subset.json").read_text())
    assert split["val"] and not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == train


def test_training_draws_only_the_subsets_training_part(tmp_path: Path, capsys, monkeypatch):
    """Every image a finetuning step trains on is in subset.json's "train" list (the 90%
    part when tuning), never its validation images nor the rest of the training set; and
    over the run every training image of the subset is drawn."""
    from selfie.data.source import MemoryBatches

    drawn: list[int] = []
    get = MemoryBatches.get

    def recording(self, step, rows, generator):
        drawn.extend(self.pool[self.sampler.batch(step)].tolist())
        return get(self, step, rows, generator)

    monkeypatch.setattr(MemoryBatches, "get", recording)
    for flag in ([], ["--validation"]):
        drawn.clear()
        out = tmp_path / f"run{len(flag)}"
        args = ["finetune", "--preset", "tiny", "--labels", "5", "--scratch", "--out", str(out)]
        code, _, err = run_cli([*args, *flag, "--set", "finetune.steps=12"], capsys)
        assert code == 0, err
        split = json.loads((out / "subset.json").read_text())
        assert len(drawn) == 12 * 16
        assert set(drawn) == set(split["train"])  # 12 steps of 16 cover the 40 or 50
        assert not set(drawn) & set(split["val"])
        assert len(split["train"]) == (40 if flag else 50)  # 10% of each class held out


# --- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """A finished tiny pretraining run (6 steps; checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert cli.main(["-q", "pretrain", "--preset", "tiny", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_compiled_finetuning_trains_the_plain_model(tmp_path: Path, capsys, monkeypatch):
    """--compile trains through torch.compile (the convergence runner's default): the summary
    says so, the loss is finite, and the exported weights are the plain model's keys."""
    # Its own inductor cache: kernels cached under the AVX-512 settings and reused with
    # ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 gave a NaN loss at step 0 (a fresh
    # cache under the AVX2 settings trains normally).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "run"
    args = ["finetune", "--preset", "tiny", "--labels", "3", "--scratch", "--compile"]
    code, _, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compile"] is True and summary["final_loss"] == summary["final_loss"]
    keys = set(load_file(out / "model.safetensors"))
    assert keys == set(build_classifier(tiny(), "resnet50").state_dict())


def test_finetune_scratch_writes_run_folder(tmp_path: Path, capsys):
    """--scratch trains and writes config, metrics, checkpoints, summary with test_acc."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        ["finetune", "--preset", "tiny", "--labels", "3", "--scratch", "--out", str(out)], capsys
    )
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["finetune"] == {
        "labels": 3,
        "head": "resnet50",
        "init": None,
        "validation": False,
        "subset_file": None,
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all("loss" in r and "acc" in r for r in records)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "step_0000003.pt",
        "step_0000006.pt",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arm"] == "scratch" and summary["train_images"] == 30
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert json.loads(stdout[: stdout.rindex("}") + 1]) == summary
    assert (out / "model.safetensors").exists()


def test_finetuning_from_scratch_learns_the_digits(tmp_path: Path):
    """Finetuning learns, not just runs: the tiny net from scratch, 10 labels per class and 150
    steps, classifies the 360 test digits far above chance (0.10). Measured on one thread:
    0.919 with the AVX-512 kernels, 0.903 with the AVX2 ones."""
    config = tiny(
        "finetune.steps=150",
        "finetune.warmup_steps=10",
        "finetune.log_every=50",
        "finetune.checkpoint_every=150",
    )
    summary = finetune(config, FinetuneSpec(10), RunOptions(out=tmp_path, progress=False))
    assert summary["train_images"] == 100 and summary["test_images"] == 360
    assert summary["test_acc"] > 0.7


def test_finetune_init_forms(tmp_path: Path, capsys, pretrain_run: Path):
    """--init takes a pretraining run folder, its model.safetensors or its last .pt
    checkpoint; all three start from the same pretrained weights."""
    p_stem = load_file(str(pretrain_run / "model.safetensors"))["patch_net.stem.0.weight"]
    finetuned = []
    for init in (
        pretrain_run,
        pretrain_run / "model.safetensors",
        pretrain_run / "checkpoints" / "step_0000006.pt",
    ):
        out = tmp_path / init.name
        args = ["finetune", "--preset", "tiny", "--labels", "3", "--init", str(init)]
        code, _, err = run_cli([*args, "--set", "finetune.steps=1", "--out", str(out)], capsys)
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["arm"] == "pretrained" and summary["init"] == str(init)
        assert 0.0 <= summary["test_acc"] <= 1.0
        finetuned.append(load_file(str(out / "model.safetensors")))
    for other in finetuned[1:]:
        assert other.keys() == finetuned[0].keys()
        for k, v in finetuned[0].items():
            assert torch.equal(other[k], v), k
    # One small step from P's weights: the stem is still close to the pretrained one.
    moved = (finetuned[0]["stem.0.weight"] - p_stem).abs().max()
    assert moved < 0.01 * p_stem.abs().max()


@pytest.fixture(scope="module")
def other_arch_run(tmp_path_factory) -> Path:
    """A tiny pretraining run whose P has a wider stage 3 than the tiny preset's."""
    out = tmp_path_factory.mktemp("other") / "run"
    args = ["-q", "pretrain", "--preset", "tiny", "--steps", "1", "--out", str(out)]
    assert cli.main([*args, "--set", "model.widths=(8,16,48,64)"]) == 0
    return out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--labels", "1.5", "--scratch"], "outside (0, 1]"),
        (["--labels", "100000", "--scratch"], "has only"),
        (["--labels", "3"], "--init CKPT or --scratch"),
        (["--labels", "3", "--init", "/nonexistent"], "not found"),
        (["--labels", "3", "--init", "{junk}/junk.pt"], "not a loadable"),
        (["--labels", "3", "--init", "{junk}/junk.safetensors"], "not a readable"),
        (["--labels", "3", "--init", "{other}"], "another architecture"),
        (["--labels", "3", "--scratch", "--head", "nope"], "invalid choice"),
    ],
    ids=["fraction", "too-many", "no-init", "missing", "junk-pt", "junk-st", "arch", "head"],
)
def test_finetune_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys, request, args: list[str], needle: str
):
    """Bad input: exit 2, one line on stderr naming the problem, and no run folder left."""
    junk = random.Random(0).randbytes(4096)
    for name in ("junk.pt", "junk.safetensors"):
        (tmp_path / name).write_bytes(junk)
    fill = {"junk": str(tmp_path)}
    if any("{other}" in a for a in args):
        fill["other"] = str(request.getfixturevalue("other_arch_run"))
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["finetune", "--preset", "tiny", *(a.format(**fill) for a in args), "--out", str(out)],
        capsys,
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("selfie: error:") and needle in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("head", ["resnet50", "attention"])
def test_finetune_resume_matches_uninterrupted_run(tmp_path: Path, capsys, head: str):
    """A run cut after its step-3 checkpoint and resumed ends with the same weights and
    test_acc as it had uninterrupted (the attention head's dropout stream included)."""
    out = tmp_path / "run"
    args = ["finetune", "--preset", "tiny", "--labels", "3", "--scratch", "--head", head]
    args += ["--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    full = json.loads((out / "summary.json").read_text())
    final = torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=True)["model"]
    # The crash: after the step-3 checkpoint, before step 6 and the summary.
    (out / "checkpoints" / "step_0000006.pt").unlink()
    (out / "summary.json").unlink()

    code, _, err = run_cli(["finetune", "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    again = torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=True)["model"]
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_finetune_accepts_a_p_that_differs_only_in_stage_4(tmp_path: Path):
    """Stage 4 is not part of P, so a pretraining run with another stage-4 width still
    transfers into the tiny ResNet-50 (stage 4 is freshly initialised anyway)."""
    config = tiny()
    other = Selfie(replace(config, model=replace(config.model, widths=(8, 16, 32, 128))))
    model = build_classifier(config, "resnet50")
    transfer_pretrained(model, "resnet50", other.state_dict(), "test")
    assert torch.equal(model.state_dict()["stem.0.weight"], other.patch_net.stem[0].weight)
