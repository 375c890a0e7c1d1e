"""bf16 autocast against fp32: the same model, batches, crops and masks for a few Selfie
pretraining steps in each precision; prints the two loss curves and their largest relative
gap. Asserts nothing.

    python benchmarks/precision_parity.py --preset paper-cifar10 --device cuda --steps 10

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from selfie.config import get_preset
from selfie.data.augment import normalize, pad_crop_flip
from selfie.data.sampler import step_generator
from selfie.device import autocast, place, warn_if_slow_bf16
from selfie.losses import selfie_loss
from selfie.models.selfie import Selfie
from selfie.optim import lr_at, make_sgd
from selfie.patches import sample_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int)
    args = parser.parse_args()
    device = torch.device(args.device)
    warn_if_slow_bf16(device, bf16=True)
    config = get_preset(args.preset)
    p, d = config.pretrain, config.data
    b = args.batch_size or p.batch_size
    torch.manual_seed(0)
    images = torch.randint(0, 256, (b * args.steps, 3, d.image_size, d.image_size))
    images = images.to(torch.uint8).to(device)
    mean = torch.full((3,), 0.5, device=device)
    std = torch.full((3,), 0.25, device=device)
    base = place(Selfie(config), device)

    def curve(bf16: bool) -> list[float]:
        model = copy.deepcopy(base)
        opt = make_sgd(model, p.lr, p.momentum, p.weight_decay)
        torch.manual_seed(1)  # the same dropout draws in both runs, as far as dtypes allow
        losses = []
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, p.lr, p.warmup_steps, p.steps)
            g = step_generator(0, step, device)
            x = pad_crop_flip(images[step * b : (step + 1) * b], d.pad, d.flip, g)
            x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
            vis, masked = sample_masks(b, d.num_patches, p.num_visible(d.num_patches), g, device)
            with autocast(device, bf16=bf16):
                out = model(x, vis, masked)
                loss = selfie_loss(out.logits, out.targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    fp32, bf16 = curve(False), curve(True)
    gap = max(abs(a - c) / abs(a) for a, c in zip(fp32, bf16, strict=True))
    for step, (a, c) in enumerate(zip(fp32, bf16, strict=True)):
        print(f"step {step:>3}  fp32 {a:.5f}  bf16 {c:.5f}  rel gap {abs(a - c) / abs(a):.2e}")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": str(device),
                "batch_size": b,
                "fp32": fp32,
                "bf16": bf16,
                "max_rel_gap": gap,
            }
        )
    )


if __name__ == "__main__":
    main()
