"""Throughput of one preset, measured in one run: a Selfie pretraining step against a
supervised finetuning step of the same preset's ResNet on the same batch, the achieved
FLOP/s as a fraction of this machine's matmul peak (MFU), and the batch pipeline
(crop/flip, normalise, masks) in images/s. Prints figures; asserts nothing.

    python benchmarks/throughput.py --preset cifar10-cpu [--bf16] [--batch-size N]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from selfie.config import get_preset
from selfie.data.augment import normalize, pad_crop_flip
from selfie.device import place
from selfie.losses import selfie_loss
from selfie.models.classifier import build_classifier
from selfie.models.selfie import Selfie
from selfie.optim import make_sgd
from selfie.patches import sample_masks


def median_seconds(fn: Callable[[], None], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def flops_of(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), warmup=3, reps=10)
    return 2 * n**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()

    config = get_preset(args.preset)
    b = args.batch_size or config.pretrain.batch_size
    d = config.data
    n_vis = config.pretrain.num_visible(d.num_patches)
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (b, 3, d.image_size, d.image_size), dtype=torch.uint8)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = normalize(pad_crop_flip(raw, d.pad, d.flip, g), mean, std)
        vis, masked = sample_masks(b, d.num_patches, n_vis, g)
        return x.contiguous(memory_format=torch.channels_last), vis, masked

    x, vis, masked = batch()
    labels = torch.randint(0, d.num_classes, (b,))
    cpu = torch.device("cpu")
    selfie, resnet = place(Selfie(config), cpu), place(build_classifier(config, "resnet50"), cpu)
    opt_s = make_sgd(selfie, 0.01, 0.9, 1e-4)
    opt_r = make_sgd(resnet, 0.01, 0.9, 1e-4)

    def step(model, opt, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    def pretext_loss() -> torch.Tensor:
        out = selfie(x, vis, masked)
        return selfie_loss(out.logits, out.targets)

    pretrain_step = step(selfie, opt_s, pretext_loss)
    supervised_step = step(resnet, opt_r, lambda: F.cross_entropy(resnet(x).float(), labels))

    t_pre = median_seconds(pretrain_step, 3, args.reps)
    t_sup = median_seconds(supervised_step, 3, args.reps)
    t_batch = median_seconds(batch, 3, args.reps * 3)
    f_pre, f_sup = flops_of(pretrain_step), flops_of(supervised_step)
    peak = matmul_peak(torch.bfloat16 if args.bf16 else torch.float32)
    result = {
        "preset": args.preset,
        "batch_size": b,
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "pretrain_images_per_s": b / t_pre,
        "supervised_images_per_s": b / t_sup,
        "pretrain_over_supervised": t_sup / t_pre,
        "pretrain_gflop_per_step": f_pre / 1e9,
        "supervised_gflop_per_step": f_sup / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
        "mfu": f_pre / t_pre / peak,
        "supervised_mfu": f_sup / t_sup / peak,
        "loader_images_per_s": b / t_batch,
    }
    for key, value in result.items():
        print(f"{key:>28}: {value:.4g}" if isinstance(value, float) else f"{key:>28}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
