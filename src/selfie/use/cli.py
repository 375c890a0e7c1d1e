"""The `selfie` commands that use a finished run: predict, embed, export, probe, inspect.

Their parsers and the lines they print; each calls one function of selfie.use. Parsed by
`selfie.cli`, which turns a UserError into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from selfie.errors import UserError


def _use_parser(sub: Any, name: str, help: str, description: str, example: str) -> Any:
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run folder (or its model.safetensors)")
    return p


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def add_use_commands(sub: Any) -> None:
    """predict, embed, export, probe, inspect: using a finished run (selfie.use)."""
    images = (
        "a folder of images (any depth, any size and mode; a first-level folder named like "
        "one of the run's classes gives the true label); default: the test split of the "
        "run's own dataset"
    )
    p = _use_parser(
        sub,
        "predict",
        "classify images with a finetuned run: one CSV row per image",
        "Classify every image with a finetuning run's classifier, decoded and normalised as "
        "its evaluation was. CSV columns: path (or index), label (where known), prediction, "
        "p_<class> for each class, error (a file that did not decode).",
        "selfie predict runs/ft --data-dir photos/ --out preds.csv",
    )
    p.add_argument("--data-dir", metavar="DIR", help=images)
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), metavar="FILE.csv")
    p.add_argument("--batch-size", type=int, default=256, metavar="N")
    _add_device_arg(p)

    p = _use_parser(
        sub,
        "embed",
        "pooled features of every image, to a .npz",
        "The pooled features of a pretraining run's P (on whole images) or of a finetuned "
        "network (the input of its classifier): arrays features (N, D), paths, labels (-1 "
        "where unknown), classes, failed.",
        "selfie embed runs/pre --data-dir photos/ --out feats.npz",
    )
    p.add_argument("--data-dir", metavar="DIR", help=images)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.npz")
    p.add_argument("--batch-size", type=int, default=256, metavar="N")
    _add_device_arg(p)

    p = _use_parser(
        sub,
        "export",
        "the network as safetensors (selfie's or timm's key names) or ONNX",
        "Export a pretraining run's backbone P, or a finetuning run's whole classifier. "
        "safetensors with selfie's keys, or with --layout timm the key names of timm's "
        "resnetv2_50 (bottleneck presets); onnx with a dynamic batch dimension, input "
        "normalised float32 images. README's 'Use the model' gives the layouts.",
        "selfie export runs/pre --format safetensors --layout timm --out p-timm.safetensors",
    )
    p.add_argument("--format", required=True, choices=("safetensors", "onnx"))
    p.add_argument("--layout", default="selfie", choices=("selfie", "timm"))
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="default: RUN/backbone.<format> (pretraining) or RUN/classifier.<format> (finetuning)",
    )

    p = _use_parser(
        sub,
        "probe",
        "frozen-feature evaluation of a pretraining run: linear probe and weighted kNN",
        "Freeze P, embed a class-balanced labelled subset of the training split and the test "
        "split, and report the test accuracy of a logistic-regression probe and of weighted "
        "kNN (cosine, k = 20 and 200, weights exp(s / 0.07)).",
        "selfie probe runs/pre --labels 0.1",
    )
    p.add_argument(
        "--labels",
        default="1.0",
        metavar="AMOUNT",
        help="the labelled subset, as for finetune (0.08, 8%%, or 400 per class); default 1.0",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the run's dataset root, if it moved (default: the one in its config.json)",
    )
    p.add_argument("--out", type=Path, metavar="FILE.json", help="also write the figures here")
    _add_device_arg(p)

    p = _use_parser(
        sub,
        "inspect",
        "a figure of what a pretraining run's model picks, and where u0 attends",
        "For a few images: the masked locations, the candidate patches, the model's pick for "
        "each location (green right, red wrong), and u0's attention over the visible patches "
        "in A's last block.",
        "selfie inspect runs/pre --n 8 --out inspect.png",
    )
    p.add_argument("--data-dir", metavar="DIR", help=images)
    p.add_argument("--n", type=int, default=8, metavar="N", help="images (default 8)")
    p.add_argument("--out", type=Path, required=True, metavar="FIG.png")
    _add_device_arg(p)


def cmd_predict(args: argparse.Namespace) -> None:
    from selfie.use.predict import predict

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    r = predict(args.run, args.data_dir, args.out, args.device, args.batch_size)
    print(f"classified {r.rows - r.errors} of {r.rows} images ({r.description})")
    if r.errors:
        print(f"{r.errors} files did not decode: rows with an error in {r.out}")
    if r.accuracy is not None:
        print(f"accuracy {r.accuracy:.4f} on the {r.labelled} images whose class is known")
    print(f"predictions: {r.out}")


def cmd_embed(args: argparse.Namespace) -> None:
    from selfie.use.embed import embed

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    r = embed(args.run, args.data_dir, args.out, args.device, args.batch_size)
    n, d = r.shape
    print(f"embedded {n} images ({r.description}) with the {r.kind} run: features {n} x {d}")
    print(f"labels known for {r.labelled}; {r.failed} files did not decode")
    print(f"arrays features, paths, labels, classes, failed: {r.out}")


def cmd_export(args: argparse.Namespace) -> None:
    from selfie.use.export import export

    r = export(args.run, args.format, args.out, args.layout)
    print(
        f"exported the {r.what}: {r.tensors} tensors, {r.parameters:,} parameters, "
        f"{r.format} ({r.layout} layout)"
    )
    print(f"file: {r.out}")


def cmd_probe(args: argparse.Namespace) -> None:
    from selfie.runfolder import write_json
    from selfie.use.probe import probe

    r = probe(args.run, args.labels, args.data_dir, args.device)
    print(
        f"frozen P features (D = {r.feature_dim}) of {r.train_images} labelled training "
        f"images, scored on {r.test_images} test images"
    )
    print(f"  linear probe (logistic regression): {r.linear_acc:.4f}")
    for k, acc in r.knn_acc.items():
        print(f"  weighted kNN, k = {k:<3} (cosine, T = {r.knn_temperature}): {acc:.4f}")
    print(f"  majority class: {r.chance:.4f}")
    if args.out is not None:
        write_json(args.out, r.to_dict())
        print(f"figures: {args.out}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from selfie.use.inspect import inspect_run

    result, out = inspect_run(args.run, args.out, args.data_dir, args.n, args.device)
    total = result.picks.numel()
    print(
        f"{len(result.images)} images, {total} masked locations: the model picked the right "
        f"patch at {result.right} ({result.right / total:.0%}; chance "
        f"{1 / result.picks.shape[1]:.0%})"
    )
    print(f"figure: {out}")


USE_COMMANDS = {
    "predict": cmd_predict,
    "embed": cmd_embed,
    "export": cmd_export,
    "probe": cmd_probe,
    "inspect": cmd_inspect,
}
