"""Patches and masks (src/selfie/patches.py)."""

import pytest
import torch

from selfie.patches import patchify, sample_masks, unpatchify


def test_unpatchify_inverts_patchify():
    """Cutting an image into patches and putting them back gives the image bit for bit."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    patches = patchify(images, 8)
    assert patches.shape == (2, 16, 3, 8, 8)
    assert torch.equal(unpatchify(patches, 4), images)


def test_patchify_is_row_major():
    """Patch (r, c) of the G x G grid sits at index r * G + c and holds that window's pixels."""
    images = torch.arange(2 * 3 * 12 * 12, dtype=torch.float32).reshape(2, 3, 12, 12)
    s, g = 4, 3
    patches = patchify(images, s)
    for r in range(g):
        for c in range(g):
            window = images[:, :, r * s : (r + 1) * s, c * s : (c + 1) * s]
            assert torch.equal(patches[:, r * g + c], window)


def test_patchify_rejects_a_patch_size_that_does_not_divide():
    """A patch size that does not divide the image is an error, not a silent crop."""
    with pytest.raises(ValueError, match="does not divide"):
        patchify(torch.zeros(1, 3, 32, 32), 7)


def test_sample_masks_splits_every_row():
    """Visible (B, V) and masked (B, M) are sorted, disjoint, and together are range(N)."""
    visible, masked = sample_masks(8, 16, 12, torch.Generator().manual_seed(0))
    assert visible.shape == (8, 12) and masked.shape == (8, 4)
    for v, m in zip(visible.tolist(), masked.tolist(), strict=True):
        assert v == sorted(v) and m == sorted(m)
        assert not set(v) & set(m)
        assert sorted(v + m) == list(range(16))


def test_sample_masks_differ_across_images():
    """Each image gets its own draw, not one mask shared by the batch."""
    visible, _ = sample_masks(8, 16, 12, torch.Generator().manual_seed(0))
    assert len({tuple(row) for row in visible.tolist()}) == 8
    # Uniform over positions: over 4,000 images each is masked 1/4 of the time (binomial
    # std 0.007; 0.03 is over 4 std), and each masked set is one of many.
    _, masked = sample_masks(4000, 16, 12, torch.Generator().manual_seed(1))
    share = torch.bincount(masked.flatten(), minlength=16).float() / 4000
    assert (share - 0.25).abs().max() < 0.03, share
    assert len({tuple(row) for row in masked.tolist()}) > 1500  # of C(16, 4) = 1,820


def test_sample_masks_reproducible_from_a_generator():
    """The same seed gives the same masks; another seed gives other masks."""
    a = sample_masks(4, 16, 8, torch.Generator().manual_seed(3))
    b = sample_masks(4, 16, 8, torch.Generator().manual_seed(3))
    c = sample_masks(4, 16, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
