"""`selfie inspect`: A's last-block attention as the encoder computes it, the picks as the
loss scores them, and the figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfie.config import get_preset
from selfie.data.digits import load_digits
from selfie.models.attention_pool import AttentionPool
from selfie.models.selfie import Selfie
from selfie.use.inspect import look
from selfie.use.run import open_trained
from tests.helpers import run_cli


def test_last_attention_is_the_last_blocks_own():
    """Running the blocks one by one reproduces the encoder's u; u0's weights are a
    distribution over [u0, tokens]; and a hand-made attention with the last block's
    projections (softmax(q k^T / sqrt(d)) per head, averaged) gives the same weights."""
    torch.manual_seed(0)
    pool = AttentionPool(dim=16, heads=2, intermediate=10, layers=3, dropout=0.1).eval()
    tokens = torch.randn(3, 5, 16)
    w = pool.last_attention(tokens)
    assert w.shape == (3, 6)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    x = pool.sequence(tokens)
    for layer in list(pool.encoder.layers)[:-1]:
        x = layer(x)
    torch.testing.assert_close(pool.encoder.layers[-1](x)[:, 0], pool(tokens))
    attn = pool.encoder.layers[-1].self_attn
    q, k, _ = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    heads = [
        torch.softmax(qh[:, :1] @ kh.transpose(1, 2) / 8**0.5, -1)
        for qh, kh in zip(q.split(8, -1), k.split(8, -1), strict=True)
    ]
    torch.testing.assert_close(w, torch.stack(heads).mean(0)[:, 0])


def test_look_picks_are_the_losss_argmax(tiny_runs):
    """The picks are the arg-max of the model's logits for each masked location, with masks
    of the run's visible fraction; right counts the picks on the diagonal."""
    run = open_trained(tiny_runs.pretrain, "cpu")
    images = load_digits(train=False).images[:6]
    result = look(run, images)
    assert result.visible.shape == (6, 12) and result.masked.shape == (6, 4)
    assert result.attention.shape == (6, 12)
    total = result.attention.sum(1) + result.attention_self
    torch.testing.assert_close(total, torch.ones(6))
    assert result.right == int((result.picks == torch.arange(4)).sum())
    again = look(run, images)
    assert torch.equal(again.masked, result.masked)  # fixed seed: the same figure twice


def test_inspect_writes_a_png(tiny_runs, tmp_path: Path, capsys):
    out = tmp_path / "fig" / "inspect.png"
    code, stdout, err = run_cli(
        ["inspect", str(tiny_runs.pretrain), "--n", "3", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "3 images, 12 masked locations" in stdout


@pytest.mark.parametrize(
    ("which", "args", "needle"),
    [
        ("finetune", ["--out", "f.png"], "needs a pretraining run"),
        ("pretrain", ["--out", "f.jpg"], "ending in .png"),
        ("pretrain", ["--out", "f.png", "--n", "0"], "at least 1 image"),
    ],
)
def test_inspect_bad_input(tiny_runs, tmp_path: Path, capsys, which, args, needle):
    run = tiny_runs.pretrain if which == "pretrain" else tiny_runs.finetune
    args = [str(tmp_path / a) if a.startswith("f.") else a for a in args]
    code, _, err = run_cli(["inspect", str(run), *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_selfie_visible_tokens_feed_the_summary():
    """summarize is A over visible_tokens: the tokens inspect's attention is computed on."""
    torch.manual_seed(0)
    model = Selfie(get_preset("tiny")).eval()
    h = torch.randn(2, 16, 32)
    visible = torch.tensor([[0, 2, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]] * 2)
    torch.testing.assert_close(
        model.summarize(h, visible), model.pool(model.visible_tokens(h, visible))
    )
