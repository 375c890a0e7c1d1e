"""Images/s of the streamed ImageNet 224 loader (`--dataset imagenet224`) on this machine.

Writes a class-folder tree of synthetic photo-sized JPEGs (500x375, ImageNet's most common
size, smooth colour fields plus noise so they compress like photos, quality 90) into a
temporary folder, then times training batches of the pretraining and finetuning crops with 1
worker and with the default number of workers. Prints figures; asserts nothing. Compare the
images/s with `benchmarks/throughput.py --preset paper-imagenet224`'s model figures.

    python benchmarks/stream_loader.py [--images 512] [--batch-size 64] [--steps 6]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfie.config import get_preset
from selfie.data.source import TrainPlan, open_source
from selfie.data.stream import default_loader_workers

CLASSES = 8


def write_jpegs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        split = "val" if i % 10 == 9 else "train"
        folder = root / split / f"n{i % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0.005, 0.03, 3)
        field = np.stack([np.sin(a * xs + i), np.cos(b * ys), np.sin(c * (xs + ys))], axis=-1)
        pixels = (127 + 100 * field + rng.normal(0, 12, field.shape)).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def images_per_s(root: Path, crop: str, workers: int, batch: int, steps: int) -> float:
    data = get_preset("paper-imagenet224").data
    source = open_source(data, "train", root, workers=workers)
    plan = TrainPlan(batch_size=batch, seed=0, steps=steps + 1, crop=crop)
    batches = source.train_batches(plan, torch.device("cpu"))
    g = torch.Generator()
    try:
        batches.get(0, slice(None), g)  # workers started and the first batch decoded
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            batches.get(step, slice(None), g)
        return batch * steps / (time.perf_counter() - t0)
    finally:
        batches.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    workers = default_loader_workers()
    result: dict[str, float | int] = {"batch_size": args.batch_size, "default_workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, args.images)
        for crop in ("pretrain", "finetune"):
            for n in sorted({1, workers}):
                key = f"{crop}_images_per_s_{n}_workers"
                result[key] = images_per_s(root, crop, n, args.batch_size, args.steps)
                print(f"{key:>40}: {result[key]:.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
