"""Checkpoints: weights_only round trip, refusal of foreign files, ordering, unwrap, export."""

import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from selfie.checkpoint import (
    FORMAT,
    atomic_save,
    checkpoint_path,
    export_safetensors,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    unwrap,
)
from selfie.errors import UserError


class Payload:
    """Arbitrary code riding in a pickle; weights_only must refuse it."""


class DDPLike(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


class CompiledLike(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _state():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "format": FORMAT,
        "step": 7,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "config": {"name": "tiny", "layers": [1, 1, 1, 1], "lr": 0.05, "flip": False},
    }


def test_round_trip(tmp_path):
    """What atomic_save writes, load_checkpoint returns equal, RNG state included."""
    state = _state()
    after_save = torch.rand(5)  # what the saved RNG state draws next
    path = checkpoint_path(tmp_path / "checkpoints", 7)
    atomic_save(state, path)
    assert [p.name for p in path.parent.iterdir()] == ["step_0000007.pt"]  # no temp file left
    loaded = load_checkpoint(path)
    _assert_same(loaded, state)
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3)
    torch.set_rng_state(loaded["rng_cpu"])
    assert torch.equal(torch.rand(5), after_save)


def test_plain_weights_only_load(tmp_path):
    """A checkpoint holds only tensors and primitives: torch.load(weights_only=True) reads it."""
    path = tmp_path / "step_0000007.pt"
    atomic_save(_state(), path)
    assert torch.load(path, weights_only=True)["format"] == FORMAT


def test_pickle_payload_is_refused(tmp_path):
    """A file that carries a pickled object is refused, never unpickled."""
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "payload": Payload()}, path)
    with pytest.raises(UserError, match="not a loadable selfie checkpoint"):
        load_checkpoint(path)


def test_random_bytes_are_refused(tmp_path):
    """A file that is not a torch checkpoint at all is a UserError."""
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(0).randbytes(2000))
    with pytest.raises(UserError, match=r"noise\.pt is not a loadable selfie checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [0, 1, 10, 0.5, -100, -1])
def test_truncated_file_is_refused(tmp_path, cut):
    """A checkpoint cut anywhere (a copy or a disk that gave up) is a UserError naming it."""
    path = tmp_path / "step_0000007.pt"
    atomic_save(_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(UserError, match=r"step_0000007\.pt is not a loadable selfie checkpoint"):
        load_checkpoint(path)


def test_flipped_byte_is_refused(tmp_path):
    """A flipped byte inside a tensor fails the zip CRC; torch.load alone would load it."""
    path = tmp_path / "step_0000007.pt"
    atomic_save(_state(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path)


def test_prune_keeps_the_newest_and_later_ones(tmp_path):
    """Pruning after saving step 6 keeps the `keep` newest up to 6, and any after it."""
    for s in (1, 2, 3, 4, 5, 6, 9):
        checkpoint_path(tmp_path, s).write_bytes(b"")
    deleted = prune_checkpoints(tmp_path, newest=6, keep=3)
    assert deleted == [checkpoint_path(tmp_path, s) for s in (1, 2, 3)]
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, s) for s in (4, 5, 6, 9)]
    prune_checkpoints(tmp_path, newest=6, keep=1)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, s) for s in (6, 9)]


@pytest.mark.parametrize("obj", [{"model": {"w": torch.zeros(2)}}, torch.zeros(3)])
def test_untagged_file_is_refused(tmp_path, obj):
    """A loadable file without the format tag is not taken for a selfie checkpoint."""
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(UserError, match="format tag"):
        load_checkpoint(path)


def test_missing_file_is_a_user_error(tmp_path):
    """A path that does not exist is a UserError naming it."""
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "step_0000001.pt")


def test_list_checkpoints_sorts_by_step(tmp_path):
    """Checkpoints come back oldest first by step number, ignoring other files."""
    steps = [10, 2, 12_000_000, 9_999_999]  # the last two would sort wrongly as text
    for s in steps:
        checkpoint_path(tmp_path, s).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / ".step_0000005.pt.tmp").write_bytes(b"")
    found = list_checkpoints(tmp_path)
    assert found == [checkpoint_path(tmp_path, s) for s in sorted(steps)]
    assert list_checkpoints(tmp_path / "absent") == []


def test_unwrap_strips_ddp_and_compile_wrappers():
    """unwrap returns the plain module under `.module` and `._orig_mod`, so keys carry no prefix."""
    inner = nn.Linear(3, 2)
    assert unwrap(inner) is inner
    assert unwrap(DDPLike(inner)) is inner
    assert unwrap(CompiledLike(inner)) is inner
    wrapped = CompiledLike(DDPLike(inner))
    assert unwrap(wrapped) is inner
    assert set(unwrap(wrapped).state_dict()) == {"weight", "bias"}


def test_export_safetensors_round_trip(tmp_path):
    """Exported weights read back with safetensors: unprefixed keys, equal values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()(torch.randn(8, 3))  # non-trivial BN running stats
    path = tmp_path / "export" / "weights.safetensors"
    export_safetensors(DDPLike(model), path)
    loaded = load_file(str(path))
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "selfie-weights-v1"
