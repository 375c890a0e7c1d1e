"""Throughput of one preset, measured in one run: a Selfie pretraining step against a
supervised finetuning step of the same preset's ResNet on the same batch, the achieved
FLOP/s as a fraction of this machine's matmul peak (MFU), and the data loader in images/s:
CIFAR-10 is read from disk once (`disk_images_per_s`, when --data-dir holds it) and then every
step's batch is gathered, cropped, flipped, normalised and masked on the device
(`loader_images_per_s`, the rate training can draw batches at). Prints figures; asserts nothing.

    python benchmarks/throughput.py --preset cifar10-cpu [--bf16] [--batch-size N]
        [--device cuda] [--compile] [--profile N]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile, supported_activities
from torch.utils.flop_counter import FlopCounterMode

from selfie.config import apply_overrides, get_preset
from selfie.data import load_dataset
from selfie.data.augment import normalize, pad_crop_flip
from selfie.device import autocast, cpu_bf16_emulated, place, warn_if_slow_bf16
from selfie.losses import selfie_loss
from selfie.models.classifier import build_classifier
from selfie.models.selfie import Selfie
from selfie.optim import make_sgd
from selfie.patches import sample_masks

CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], warmup: int, reps: int, device: torch.device = CPU
) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def interleaved_seconds(
    fns: list[Callable[[], object]], warmup: int, reps: int, device: torch.device = CPU
) -> list[float]:
    """Median seconds of each of `fns`, timed in turn within every repetition, so a drift of
    the machine's speed (a shared VM's) weighs on all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def flops_of(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def print_profile(name: str, fn: Callable[[], None], rows: int) -> None:
    """The `rows` ops with the most self time over 2 steps, after 1 warm-up step."""
    fn()
    with profile(activities=supported_activities()) as prof:
        fn()
        fn()
    print(f"--- {name} step, 2 steps ---")
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40))


def disk_images_per_s(data_dir: str) -> float | None:
    """CIFAR-10's 50,000 training images read and checked from disk, per second (the loader's
    one-time cost); None when the folder does not hold CIFAR-10."""
    if not (Path(data_dir) / "cifar-10-batches-py").is_dir():
        return None
    t0 = time.perf_counter()
    train = load_dataset("cifar10", "train", data_dir, 32)
    return len(train) / (time.perf_counter() - t0)


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a large square matmul: 2048 on CPU, 8192 on a GPU (to fill it)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), 3, 10, device)
    return 2 * n**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--data-dir",
        default="../shared/data/cifar10",
        help="CIFAR-10 folder for the disk read figure (skipped when absent)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also print the N costliest ops"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    warn_if_slow_bf16(device, args.bf16)

    config = apply_overrides(get_preset(args.preset), args.overrides)
    b = args.batch_size or config.pretrain.batch_size
    d = config.data
    n_vis = config.pretrain.num_visible(d.num_patches)
    torch.manual_seed(0)
    shape = (b, 3, d.image_size, d.image_size)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    mean = torch.full((3,), 0.5, device=device)
    std = torch.full((3,), 0.25, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = normalize(pad_crop_flip(raw, d.pad, d.flip, g), mean, std)
        vis, masked = sample_masks(b, d.num_patches, n_vis, g, device)
        return x.contiguous(memory_format=torch.channels_last), vis, masked

    x, vis, masked = batch()
    labels = torch.randint(0, d.num_classes, (b,), device=device)
    selfie = place(Selfie(config), device)
    resnet = place(build_classifier(config, "resnet50"), device)
    opt_s = make_sgd(selfie, 0.01, 0.9, 1e-4)
    opt_r = make_sgd(resnet, 0.01, 0.9, 1e-4)

    def step(opt, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with autocast(device, bf16=args.bf16):
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    def steps(run_selfie: nn.Module, run_resnet: nn.Module) -> dict[str, Callable[[], None]]:
        """A pretraining and a supervised step calling these modules (the eager ones, or the
        same weights compiled)."""

        def pretext_loss() -> torch.Tensor:
            out = run_selfie(x, vis, masked)
            return selfie_loss(out.logits, out.targets)

        def supervised_loss() -> torch.Tensor:
            return F.cross_entropy(run_resnet(x).float(), labels)

        return {"pretrain": step(opt_s, pretext_loss), "supervised": step(opt_r, supervised_loss)}

    eager = steps(selfie, resnet)
    timed = eager
    speedup: dict[str, float] = {}
    if args.compile:
        timed = steps(torch.compile(selfie), torch.compile(resnet))
        # Eager and compiled steps of the same weights in turn (the first compiled calls
        # build the graphs): the speed-up is a ratio measured in one run.
        for name in timed:
            pair = [eager[name], timed[name]]
            eager_s, compiled_s = interleaved_seconds(pair, 3, args.reps, device)
            speedup[f"compile_speedup_{name}"] = eager_s / compiled_s

    if args.profile:
        for name, fn in timed.items():
            print_profile(name, fn, args.profile)
    t_pre = median_seconds(timed["pretrain"], 3, args.reps, device)
    t_sup = median_seconds(timed["supervised"], 3, args.reps, device)
    t_batch = median_seconds(batch, 3, args.reps * 3, device)
    # FLOPs are counted on the eager models: the compiled graph does the same arithmetic.
    pretrain_step, supervised_step = eager["pretrain"], eager["supervised"]
    f_pre, f_sup = flops_of(pretrain_step), flops_of(supervised_step)
    peak = matmul_peak(torch.bfloat16 if args.bf16 else torch.float32, device)
    disk = disk_images_per_s(args.data_dir)
    result = {
        "preset": args.preset,
        "batch_size": b,
        "bf16": args.bf16,
        "device": str(device),
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_emulated": cpu_bf16_emulated() if device.type == "cpu" else None,
        "pretrain_images_per_s": b / t_pre,
        "supervised_images_per_s": b / t_sup,
        "pretrain_over_supervised": t_sup / t_pre,
        "pretrain_gflop_per_step": f_pre / 1e9,
        "supervised_gflop_per_step": f_sup / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
        "mfu": f_pre / t_pre / peak,
        "supervised_mfu": f_sup / t_sup / peak,
        "loader_images_per_s": b / t_batch,
        "disk_images_per_s": disk,
    } | speedup
    for key, value in result.items():
        print(f"{key:>28}: {value:.4g}" if isinstance(value, float) else f"{key:>28}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
