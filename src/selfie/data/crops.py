"""The crops of streamed images (see `selfie.data.stream`): a box, one resize, maybe a flip.

Each crop is a box chosen in the upright image's pixel coordinates from its size alone (read
from the file's header) and, for the random ones, a numpy Generator. `decode_crop` then decodes
the file, a JPEG at the smallest 1/2, 1/4 or 1/8 scale that still leaves at least S pixels
across the box, and resizes the box straight to S x S with Pillow's antialiased bilinear
filter: crop and resize in one step, with no rounding of an intermediate size.

- "finetune": random-resized crop, the standard ImageNet training crop: a box of uniform area
  in (0.08, 1) of the image and log-uniform aspect ratio in (3/4, 4/3), up to 10 tries, else
  the centre crop (clamped to those ratios); flipped left-right with probability 1/2.
- "pretrain": the shorter side resized to S, a random S x S window along the longer side
  (our choice: SPEC 3 says only that images are 224 px), flipped with probability 1/2
  (SPEC 7).
- "eval": the shorter side resized to round(S * 256 / 224) (256 for S = 224), the centre
  S x S window; no randomness.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from selfie.data.folder import open_image, upright_rgb, upright_size

PRETRAIN, FINETUNE, EVAL = "pretrain", "finetune", "eval"
CROPS = (PRETRAIN, FINETUNE, EVAL)
AREA = (0.08, 1.0)  # random-resized crop: fraction of the image's area
RATIO = (3 / 4, 4 / 3)  # random-resized crop: width / height
TRIES = 10
EVAL_RESIZE = 256 / 224  # evaluation: shorter side to S * 256 / 224, then the centre S x S

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in upright pixels


def random_resized_box(w: int, h: int, rng: np.random.Generator) -> Box:
    """Random area and aspect ratio (module docstring), in whole pixels as is standard."""
    area = w * h
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(TRIES):
        target = area * rng.uniform(*AREA)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return (left, top, left + cw, top + ch)
    # No try fitted (a very long image): the centre crop, its ratio clamped to RATIO.
    if w / h < RATIO[0]:
        cw, ch = w, round(w / RATIO[0])
    elif w / h > RATIO[1]:
        cw, ch = round(h * RATIO[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return (left, top, left + cw, top + ch)


def random_square_box(w: int, h: int, size: int, rng: np.random.Generator) -> Box:
    """The square of the shorter side at a random offset along the longer one: the same as
    resizing the shorter side to `size` and cropping a random whole-pixel window there."""
    short, long = min(w, h), max(w, h)
    slack = max(0, round(long * size / short) - size)  # free pixels along the resized side
    start = min(int(rng.integers(0, slack + 1)) * short / size, long - short)
    return (start, 0, start + short, short) if w >= h else (0, start, short, start + short)


def centre_box(w: int, h: int, size: int) -> Box:
    """The centre S x S window after resizing the shorter side to round(S * 256 / 224)."""
    side = min(w, h) * size / round(size * EVAL_RESIZE)  # the window, in upright pixels
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def choose_box(
    crop: str, w: int, h: int, size: int, rng: np.random.Generator | None
) -> tuple[Box, bool]:
    """(box, flip) for an upright w x h image; `rng` is needed by the random crops."""
    if crop == EVAL:
        return centre_box(w, h, size), False
    if rng is None:
        raise ValueError(f"crop {crop!r} is random and needs a generator")
    if crop == FINETUNE:
        box = random_resized_box(w, h, rng)
    elif crop == PRETRAIN:
        box = random_square_box(w, h, size, rng)
    else:
        raise ValueError(f"unknown crop {crop!r}; use one of {CROPS}")
    return box, bool(rng.random() < 0.5)


def decode_crop(
    path: str,
    crop: str,
    size: int,
    flip: bool,
    max_pixels: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One file -> uint8 (3, size, size); raises for a file that does not decode (see
    folder.open_image for the pixel limit). A random flip is drawn (and applied if `flip`)
    after the box, so the box does not depend on `flip`."""
    with open_image(path, max_pixels) as opened:
        w, h = upright_size(opened)
        box, mirrored = choose_box(crop, w, h, size, rng)
        bw, bh = box[2] - box[0], box[3] - box[1]
        # Decode at reduced scale only while the box keeps >= size pixels on both sides.
        need = (math.ceil(w * size / bw), math.ceil(h * size / bh))
        rgb, scale = upright_rgb(opened, need)
    # Box to decoded pixels; min() absorbs the rounding up of a drafted size.
    dw, dh = rgb.size
    scaled = (
        min(box[0] * scale, dw),
        min(box[1] * scale, dh),
        min(box[2] * scale, dw),
        min(box[3] * scale, dh),
    )
    out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=scaled)
    if flip and mirrored:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))  # (3, S, S)


__all__ = ["CROPS", "EVAL", "FINETUNE", "PRETRAIN", "choose_box", "decode_crop"]
