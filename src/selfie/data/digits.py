"""scikit-learn's 8x8 handwritten digits, upscaled to RGB: a real dataset that needs no download.

1,797 images, values 0..16, shipped inside scikit-learn. They make the end-to-end tests and
quick experiments run on real images offline, at the same (N, 3, H, W) uint8 shape as
CIFAR-10, so one model serves both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from selfie.data import ImageSet
from selfie.errors import UserError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
CLASSES = tuple(str(d) for d in range(10))


def load_digits(train: bool, image_size: int = 32) -> ImageSet:
    """Train (1,437) or test (360) digits as uint8 (N, 3, image_size, image_size).

    The split is stratified and fixed (random_state 0), so every run sees the same images.
    """
    # Imported here because scikit-learn is slow to import and only this loader needs it.
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    bunch = sklearn_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    idx = np.sort(train_idx if train else test_idx)  # keep scikit-learn's original order

    x = torch.from_numpy(bunch.images[idx]).float() * (255.0 / 16.0)  # (n, 8, 8) in 0..255
    x = F.interpolate(
        x[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )  # (n, 1, S, S)
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return ImageSet(images=images, labels=torch.from_numpy(labels[idx]), classes=CLASSES)
