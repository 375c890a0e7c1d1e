"""Configuration: overrides, validation, presets and their JSON round trip."""

import json
import re

import pytest

from selfie.config import (
    PRESETS,
    apply_overrides,
    config_from_dict,
    get_preset,
    validate,
)
from selfie.errors import UserError


def _flat(config):
    return {
        (s, k): v
        for s, sec in config.to_dict().items()
        if isinstance(sec, dict)
        for k, v in sec.items()
    }


@pytest.mark.parametrize(
    ("item", "section", "key", "value"),
    [
        ("pretrain.lr=0.3", "pretrain", "lr", 0.3),
        ("pretrain.lr=1", "pretrain", "lr", 1.0),
        ("pretrain.steps=250", "pretrain", "steps", 250),
        ("model.layers=(1,2,3)", "model", "layers", (1, 2, 3)),
        ("model.layers=[1,2,3]", "model", "layers", (1, 2, 3)),
        ("data.flip=False", "data", "flip", False),
        ("data.dataset=digits", "data", "dataset", "digits"),
    ],
)
def test_override_changes_only_its_key(item, section, key, value):
    """A good `--set` value is parsed to the field's type and touches no other field."""
    base = get_preset("paper-cifar10")
    new = apply_overrides(base, [item])
    got = getattr(getattr(new, section), key)
    assert got == value and type(got) is type(value)
    before, after = _flat(base), _flat(new)
    changed = {k for k in before if before[k] != after[k]}
    assert changed <= {(section, key)}


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("pretrain.lrr=0.1", "unknown key 'pretrain.lrr'"),
        ("lr=0.1", "unknown key 'lr'"),  # no section
        ("optim.lr=0.1", "unknown key 'optim.lr'"),
        ("pretrain.lr", "no value; write pretrain.lr=VALUE"),
        ("pretrain.lr=abc", "expected a value of type float"),
        ("pretrain.steps=1.5", "expected a value of type int"),
        ("data.flip=1", "expected a value of type bool"),
        ("model.layers=(1,2.5)", "expected a value of type tuple"),
    ],
)
def test_bad_override_is_a_user_error(item, needle):
    """Unknown keys, missing sections and values, and mistyped values are refused with a
    UserError that names what is wrong."""
    with pytest.raises(UserError, match=re.escape(f"--set {item}: {needle}")):
        apply_overrides(get_preset("tiny"), [item])


def test_override_is_never_evaluated():
    """Code in a `--set` value never runs: a float field refuses it, a str field keeps the text."""
    code = "__import__('os').getcwd()"
    with pytest.raises(UserError, match=re.escape(f"--set pretrain.lr={code}")):
        apply_overrides(get_preset("tiny"), [f"pretrain.lr={code}"])
    assert apply_overrides(get_preset("tiny"), [f"data.dataset={code}"]).data.dataset == code


def test_validate_rejects_patch_size_not_dividing_image():
    """A patch size that leaves a partial patch is refused."""
    with pytest.raises(UserError, match="does not divide"):
        validate(apply_overrides(get_preset("tiny"), ["data.patch_size=7"]))


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("data.pad_mode=edge", "data.pad_mode must be 'zero' or 'reflect', not 'edge'"),
        ("data.pad=40", "data.pad=40 must be smaller than the image to reflect it"),
    ],
)
def test_validate_rejects_bad_pad_mode(item, needle):
    """Padding is zeros or a reflection, and a reflection needs the pad inside the image."""
    config = apply_overrides(get_preset("tiny"), ["data.pad_mode=reflect", item])
    with pytest.raises(UserError, match=re.escape(needle)):
        validate(config)
    assert validate(apply_overrides(get_preset("tiny"), ["data.pad_mode=reflect"]))


@pytest.mark.parametrize("fraction", [1.0, 0.99, 0.0])
def test_validate_rejects_visible_fraction_without_masked_or_visible(fraction):
    """A visible fraction that leaves no masked (or no visible) patch is refused."""
    cfg = apply_overrides(get_preset("tiny"), [f"pretrain.visible_fraction={fraction}"])
    with pytest.raises(UserError, match="visible_fraction"):
        validate(cfg)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_survive_json(name):
    """Every preset is valid and config_from_dict(JSON of to_dict()) gives it back."""
    cfg = get_preset(name)
    assert validate(cfg) is cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_preset_lists_the_presets():
    """An unknown preset name is a UserError whose message names every preset."""
    with pytest.raises(UserError) as info:
        get_preset("paper-cifar100")
    for name in PRESETS:
        assert name in str(info.value)


def test_paper_cifar10_has_the_papers_values():
    """paper-cifar10 holds SPEC 2-4's numbers."""
    cfg = get_preset("paper-cifar10")
    p, m, d = cfg.pretrain, cfg.model, cfg.data
    assert (p.batch_size, p.steps, p.warmup_steps) == (512, 120_000, 100)
    assert (p.momentum, p.weight_decay) == (0.9, 1e-4)
    assert (d.image_size, d.patch_size, d.grid) == (32, 8, 4)
    assert (m.attn_layers, m.attn_heads, m.attn_intermediate, m.attn_dropout) == (3, 32, 640, 0.1)
    assert (m.block, m.layers, m.patch_dim) == ("bottleneck", (3, 4, 6, 3), 1024)
    assert m.position == "cell"


@pytest.mark.parametrize(
    ("name", "batch", "pad"),
    [("paper-cifar10", 512, 4), ("paper-imagenet32", 1024, 4), ("paper-imagenet224", 1024, 0)],
)
def test_paper_presets_hold_the_papers_protocol(name, batch, pad):
    """Beyond the pretraining section: the augmentation (zero-pad 4 and crop on 32-px
    images, flip), p = 0.75, and a finetuning recipe like the pretraining one (SPEC 3-5):
    120k steps, 100 warm-up, Nesterov 0.9, weight decay 1e-4, the paper's LR grid, 10%
    validation split."""
    cfg = get_preset(name)
    d, p, f = cfg.data, cfg.pretrain, cfg.finetune
    assert (d.pad, d.flip, p.visible_fraction) == (pad, True, 0.75)
    for section in (p, f):
        assert (section.batch_size, section.steps, section.warmup_steps) == (batch, 120_000, 100)
        assert (section.momentum, section.weight_decay) == (0.9, 1e-4)
    assert f.lr_grid == (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    assert f.val_fraction == 0.1


def test_paper_imagenet224_has_the_papers_values():
    """paper-imagenet224: batch 1024, 224-px images, 32-px patches, a 7x7 grid."""
    cfg = get_preset("paper-imagenet224")
    assert cfg.pretrain.batch_size == 1024
    assert (cfg.data.image_size, cfg.data.patch_size, cfg.data.grid) == (224, 32, 7)
    assert cfg.model.stem == "imagenet"
    assert cfg.model.position == "rowcol"
