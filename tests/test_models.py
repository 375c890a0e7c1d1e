"""The networks: gradients, batching equivalence, output shapes and the paper's sizes."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from selfie.config import get_preset
from selfie.losses import selfie_loss
from selfie.models.position import PositionEmbedding
from selfie.models.resnet_v2 import ResNetV2
from selfie.models.selfie import Selfie
from selfie.patches import patchify, sample_masks


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tiny(seed: int = 0) -> Selfie:
    torch.manual_seed(seed)
    return Selfie(get_preset("tiny"))


def test_every_parameter_gets_a_finite_gradient():
    """One backward pass reaches every parameter of P, A and the positions, finitely."""
    model = _tiny().train()
    images = torch.randn(4, 3, 32, 32)
    visible, masked = sample_masks(4, 16, 12, torch.Generator().manual_seed(0))
    out = model(images, visible, masked)
    selfie_loss(out.logits, out.targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_patch_net_batched_equals_patch_by_patch():
    """encode_patches (one batched call) gives each patch the vector P gives it alone."""
    model = _tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.encode_patches(images)
        patches = patchify(images, 8)
        for n in range(16):  # the second image: its patches sit after the first's 16
            alone = model.patch_net(patches[1, n][None])[0]
            torch.testing.assert_close(h[1, n], alone, rtol=0, atol=1e-5)


def test_forward_shapes_and_targets():
    """Forward returns (B, M, M) logits and targets arange(M) for every image."""
    model = _tiny().eval()
    visible, masked = sample_masks(3, 16, 12, torch.Generator().manual_seed(0))
    out = model(torch.randn(3, 3, 32, 32), visible, masked)
    assert out.logits.shape == (3, 4, 4)
    assert torch.equal(out.targets, torch.arange(4).expand(3, 4))


def test_summary_reads_only_the_visible_patches_with_their_positions():
    """u depends on the visible patches alone (masked pixels changed: u unchanged), and
    equals A run by hand on [u0, h_v + pos_v]: positions added to the visible tokens, u read
    at u0's slot (not the mean token)."""
    model = _tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    visible, masked = sample_masks(2, 16, 12, torch.Generator().manual_seed(1))
    changed = patchify(images, 8).clone()  # (B, N, C, 8, 8)
    for b in range(2):
        changed[b, masked[b]] = torch.randn_like(changed[b, masked[b]])
    grid = changed.reshape(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)
    assert torch.equal(patchify(grid, 8)[0, visible[0]], patchify(images, 8)[0, visible[0]])
    with torch.no_grad():
        h = model.encode_patches(images)
        u = model.summarize(h, visible)
        u_changed = model.summarize(model.encode_patches(grid), visible)
        torch.testing.assert_close(u_changed, u, rtol=0, atol=1e-6)
        table = model.position()  # (N, D)
        for b in range(2):
            tokens = torch.stack([h[b, v] + table[v] for v in visible[b].tolist()])
            sequence = torch.cat([model.pool.u0[None], tokens])[None]  # (1, 1 + V, D)
            by_hand = model.pool.encoder(sequence)[0, 0]
            torch.testing.assert_close(u[b], by_hand, rtol=1e-5, atol=1e-5)
        # Without the positions, or reading the mean token, u would differ.
        no_pos = model.pool(h[:1, visible[0]])[0]
        assert (no_pos - u[0]).abs().max() > 1e-3
        mean_token = model.pool.encoder(sequence)[0].mean(0)
        assert (mean_token - u[1]).abs().max() > 1e-3


def test_paper_cifar10_parameter_counts():
    """At paper size Selfie has about 25M parameters and the finetuning ResNet-50 about 23.5M."""
    cfg = get_preset("paper-cifar10")
    with torch.device("meta"):
        selfie = Selfie(cfg)
        resnet = ResNetV2(cfg.model, num_stages=4, num_classes=10)
    assert 24.5e6 <= _count(selfie) <= 25.5e6
    assert 23.4e6 <= _count(resnet) <= 23.6e6


def test_paper_patch_net_outputs_1024():
    """P at paper size (ResNet-50 stem + stages 1-3) maps each patch to a 1024-d vector."""
    with torch.device("meta"):
        selfie = Selfie(get_preset("paper-cifar10"))
        out = selfie.patch_net(torch.empty(2, 3, 8, 8))
    assert selfie.patch_net.out_dim == 1024
    assert out.shape == (2, 1024)


def test_paper_imagenet224_rowcol_positions():
    """The 7x7 grid learns 7 row + 7 column vectors, and cell (i, j) is row[i] + col[j]."""
    cfg = get_preset("paper-imagenet224")
    with torch.device("meta"):
        selfie = Selfie(cfg)
    assert selfie.position.kind == "rowcol"
    assert _count(selfie.position) == 2 * 7 * 1024
    torch.manual_seed(0)
    pos = PositionEmbedding(cfg.data.grid, cfg.model.patch_dim, cfg.model.position)
    table = pos()
    assert table.shape == (49, 1024)
    for i in range(7):
        for j in range(7):
            assert torch.equal(table[i * 7 + j], pos.row[i] + pos.col[j])


def test_paper_attention_pool_is_three_post_ln_blocks():
    """A is 3 post-LN Transformer blocks with 32 heads and a 1024 -> 640 -> 1024 GELU MLP."""
    with torch.device("meta"):
        selfie = Selfie(get_preset("paper-cifar10"))
    blocks = list(selfie.pool.encoder.layers)
    assert len(blocks) == 3
    for block in blocks:
        assert isinstance(block, nn.TransformerEncoderLayer)
        assert block.norm_first is False
        assert block.self_attn.num_heads == 32
        assert block.linear1.in_features == 1024
        assert block.linear1.out_features == 640
        assert block.dropout.p == pytest.approx(0.1)
        assert block.activation is torch.nn.functional.gelu


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_v2_forward_shapes(block):
    """P maps (B,3,8,8) to (B, D); the 4-stage classifier maps (B,3,32,32) to (B, 10)."""
    cfg = replace(get_preset("tiny").model, block=block)
    torch.manual_seed(0)
    patch_net = ResNetV2(cfg, num_stages=3).eval()
    classifier = ResNetV2(cfg, num_stages=4, num_classes=10).eval()
    with torch.no_grad():
        assert patch_net(torch.randn(5, 3, 8, 8)).shape == (5, cfg.widths[2])
        assert classifier(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_backward_is_deterministic_with_two_threads():
    """Two identical backward passes give bitwise-equal gradients on 2 CPU threads (indexing
    the position table directly made its gradient differ in the last bits between passes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = Selfie(get_preset("digits")).eval()
        x = torch.randn(64, 3, 32, 32)
        visible, masked = sample_masks(64, 16, 12, torch.Generator().manual_seed(0))

        def grads() -> dict[str, torch.Tensor]:
            model.zero_grad()
            out = model(x, visible, masked)
            selfie_loss(out.logits, out.targets).backward()
            return {n: p.grad.clone() for n, p in model.named_parameters()}

        first, second = grads(), grads()
        assert all(torch.equal(first[n], second[n]) for n in first)
    finally:
        torch.set_num_threads(before)


ODD_BATCHES = """
import torch
from selfie.config import get_preset
from selfie.models.resnet_v2 import ResNetV2

torch.set_num_threads(2)
torch.manual_seed(0)
model = ResNetV2(get_preset("tiny").model, num_classes=10).to(memory_format=torch.channels_last)
for batch in (3, 5, 7, 9, 17):
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        model(x).logsumexp(-1).mean().backward()
print("trained")
"""


def test_odd_batches_train_without_crashing():
    """Odd batches with 2 threads and channels_last train (in a child process, so a crash is
    a failure, not the end of the test run). torch 2.13's oneDNN weight gradient of a
    strided 1x1 convolution segfaults here on AVX-512 CPUs; the shortcut avoids it
    (StridedPointwise), and equals the strided convolution it replaces."""
    import subprocess
    import sys

    from selfie.models.resnet_v2 import StridedPointwise

    done = subprocess.run([sys.executable, "-c", ODD_BATCHES], capture_output=True, text=True)
    assert done.returncode == 0 and "trained" in done.stdout, (done.returncode, done.stderr)
    torch.manual_seed(0)
    ours = StridedPointwise(8, 16, 2)
    plain = nn.Conv2d(8, 16, 1, 2, bias=False)
    plain.load_state_dict(ours.state_dict())
    for size in (8, 9):
        x = torch.randn(2, 8, size, size)
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=1e-6)
