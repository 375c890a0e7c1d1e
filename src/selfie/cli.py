"""The `selfie` command line: parses arguments, builds a config, calls one function.

Bad input raises UserError; `main` prints it as one line on stderr and returns 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from selfie import distributed
from selfie.config import PRESETS, Config, apply_overrides, get_preset, validate
from selfie.data import DATASETS
from selfie.errors import Interrupted, UserError
from selfie.models.classifier import HEADS
from selfie.runfolder import RunOptions
from selfie.use.cli import USE_COMMANDS, add_use_commands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_unlabelled_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--unlabelled-dir",
        metavar="DIR",
        help="pretrain on every image under DIR (any depth, no class folders needed) instead "
        "of the dataset's training split; the pretext accuracy is still measured on the "
        "dataset's test split, and finetuning reads --data-dir's labels",
    )


def _default_out(kind: str, preset: str) -> Path:
    return Path("runs") / f"{kind}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _add_config_args(p: argparse.ArgumentParser, preset_required: bool = True) -> None:
    p.add_argument(
        "--preset",
        required=preset_required,
        metavar="NAME",
        help=f"the settings to start from: {', '.join(PRESETS)} (see `selfie presets`)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set pretrain.lr=0.05 --set model.widths=(32,64,128,256);"
        " values are Python literals; `selfie show-config` lists the keys",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        help="the data to train on instead of the preset's (the same as --set data.dataset=NAME):"
        " folder for your own images in --data-dir",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="dataset root: for cifar10 the folder that holds cifar-10-batches-py/ "
        "(default: data/cifar10); for folder (--dataset folder) any folder of images, "
        "class sub-folders giving labels; for imagenet224 the folder that holds train/ and val/, "
        "one sub-folder per class in each; refused for the built-in digits, which read none",
    )
    p.add_argument("--download", action="store_true", help="fetch the dataset if missing")
    p.add_argument("--out", type=Path, metavar="DIR", help="run folder (default: runs/...)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps (overrides the preset)")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="images per step, over all processes under torchrun; the preset's peak LR is kept "
        "(no linear scaling)",
    )
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default: the preset's)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on CPU/GPU)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="float16 autocast with a gradient scaler, for GPUs without bfloat16 (not on CPU)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow first steps)"
    )
    p.add_argument(
        "--accum",
        type=int,
        default=1,
        metavar="K",
        help="gradient accumulation: each process splits its share of the batch into K "
        "micro-batches (when a device cannot hold its share); the batch stays the preset's",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun, BatchNorm statistics over the whole batch of all processes "
        "(GPUs only); default: each process normalises over its own share",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (default), cpu, cuda or cuda:N; under torchrun each process takes "
        "device LOCAL_RANK of the kind given",
    )
    _add_workers_arg(p)
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the logged scalars to the run folder's tb/ for TensorBoard "
        "(needs pip install 'selfie[tensorboard]')",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")


def _add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes decoding a streamed dataset's files (imagenet224; default: the CPUs "
        "this process may use, at most 8; 0 decodes in the training process)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="selfie",
        description="Selfie self-supervised pretraining (Trinh, Luong, Le 2019): pretrain a "
        "ResNet on unlabelled images by picking the right patch for each masked location.",
        epilog="start here:\n"
        "  selfie quickstart                         the whole story on built-in data, ~3 min\n"
        "  selfie pretrain --preset cifar10-cpu --data-dir DIR --bf16 --out runs/c10\n"
        "  selfie finetune --preset cifar10-cpu --labels 0.08 --init runs/c10 --data-dir DIR\n"
        "  selfie experiment --preset cifar10-cpu --labels 0.05,0.08,0.2 --seeds 5 --tune ...\n"
        "every command has --help; `selfie presets` lists the settings to start from",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pretrain", help="pretrain P and A on images without labels")
    _add_config_args(p, preset_required=False)
    _add_unlabelled_arg(p)
    _add_run_args(p)

    p = sub.add_parser(
        "finetune",
        help="train a classifier on a labelled subset, from pretrained weights or from scratch",
        description="Finetune on a class-balanced labelled subset of the training set. The "
        "test split is read once, after training, for the reported test_acc.",
    )
    _add_config_args(p, preset_required=False)
    labelled = p.add_mutually_exclusive_group()
    labelled.add_argument(
        "--labels",
        metavar="AMOUNT",
        help="labelled images: a fraction of the training set (0.08, 8%%; 1.0 is every "
        "labelled image; balanced over the classes where they allow) or a whole number of "
        "images per class (400)",
    )
    labelled.add_argument(
        "--subset-file",
        metavar="FILE",
        help="labelled images named in FILE, one a line: a file name (SimCLR's 1%% and 10%% "
        "ImageNet lists) or a path relative to the training split's folder; image folders "
        "and imagenet224 only",
    )
    init = p.add_mutually_exclusive_group()
    init.add_argument(
        "--init",
        metavar="CKPT",
        help="pretrained weights: a pretraining run folder, its model.safetensors, or a .pt "
        "checkpoint",
    )
    init.add_argument(
        "--scratch", action="store_true", help="random initialisation: the supervised baseline"
    )
    p.add_argument(
        "--head",
        choices=HEADS,
        default="resnet50",
        help="resnet50: the ResNet v2 with stem and stages 1-3 from P (default); attention: "
        "P's trunk, then A pools the stage-3 map (the paper's Table 2 variant)",
    )
    p.add_argument(
        "--validation",
        action="store_true",
        help="hold out finetune.val_fraction of the subset and report val_acc (for tuning); "
        "the test split is then never read",
    )
    _add_run_args(p)

    p = sub.add_parser(
        "experiment",
        help="the paper's protocol in one command: pretrain once, finetune both arms per "
        "labelled amount and seed, then table and figure",
        description="Pretrain once without labels (or reuse --pretrained), then for each head, "
        "labelled amount and arm (Selfie pretrained, scratch) optionally tune the peak LR on a "
        "90/10 split of the subset, and train on the whole subset once per seed. Resumable: "
        "run it again to skip finished runs and resume interrupted ones.",
    )
    _add_config_args(p)
    p.add_argument(
        "--labels",
        default="",
        metavar="A,B,...",
        help="labelled amounts, comma-separated: fractions (0.05,0.08,0.2,1.0) or images per "
        "class (10,25)",
    )
    p.add_argument(
        "--subset-file",
        action="append",
        default=[],
        metavar="FILE",
        help="one more cell: the labelled images FILE names (see `selfie finetune -h`); "
        "repeat for several files",
    )
    p.add_argument("--seeds", type=int, default=5, metavar="N", help="runs per cell (default 5)")
    p.add_argument(
        "--tune",
        action="store_true",
        help="choose each arm's peak LR from finetune.lr_grid by validation accuracy",
    )
    p.add_argument(
        "--tune-visible",
        metavar="P,Q,...",
        help="pretrain once per visible fraction p (the paper: 0.75,0.5) and give each cell's "
        "pretrained arm the p of best validation accuracy on the 90/10 split",
    )
    _add_unlabelled_arg(p)
    p.add_argument("--pretrained", metavar="CKPT", help="reuse these weights; skip pretraining")
    p.add_argument(
        "--heads",
        default="resnet50",
        metavar="H,...",
        help=f"finetuning heads, comma-separated, from: {', '.join(HEADS)}",
    )
    p.add_argument("--pretrain-steps", type=int, metavar="N", help="override pretrain.steps")
    p.add_argument("--finetune-steps", type=int, metavar="N", help="override finetune.steps")
    p.add_argument("--out", type=Path, metavar="DIR", help="experiment folder (default: runs/...)")
    p.add_argument("--data-dir", metavar="DIR", help="dataset root (see `selfie pretrain -h`)")
    p.add_argument("--download", action="store_true", help="fetch the dataset if missing")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile each run's model (slow first steps)"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    _add_workers_arg(p)

    p = sub.add_parser("report", help="render table.md, table.csv, figure.png from results")
    p.add_argument("folder", type=Path, help="an experiment folder holding results.jsonl")

    p = sub.add_parser("show-config", help="print the resolved config and parameter counts")
    _add_config_args(p)

    sub.add_parser("presets", help="list the presets")

    p = sub.add_parser("quickstart", help="the main job on the built-in digits, no set-up")
    p.add_argument("--out", type=Path, metavar="DIR", help="run folder (default: runs/...)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")

    add_use_commands(sub)

    p = sub.add_parser("data", help="dataset tools: `selfie data check` verifies a dataset folder")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data_sub.add_parser(
        "check",
        help="verify a dataset folder: files, counts, shapes, known checksums",
        description="Print a short report; with problems, print one line per problem on "
        "stderr and exit 2. cifar10: every file present, md5 sums (official release or the "
        "known rebuilt copy), safe unpickling, 10,000 rows of 3,072 uint8 per batch, labels "
        "0..9, 5,000/1,000 per class. imagenet32: every npz file, shapes, dtypes, labels "
        "1..1000, classes present. folder: layout, counts per class, files that do not "
        "decode, image sizes. imagenet224: train/ and val/ class folders, files per class "
        "(with --decode, also every file decoded, as for folder).",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="cifar10: the folder that holds cifar-10-batches-py/ (default: data/cifar10); "
        "imagenet32: the folder of npz files; folder: the folder of images (required); "
        "imagenet224: the folder that holds train/ and val/",
    )
    p.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="folder, imagenet224: decode at this size and count the images smaller than it "
        "(default 32; 224 for imagenet224)",
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="imagenet224: decode every file as well (slow: ImageNet has 1.33M files)",
    )
    return parser


def _config(args: argparse.Namespace, section: str = "pretrain") -> Config | None:
    """The preset with --set overrides, then --steps/--batch-size/--seed on `section`."""
    if args.preset is None:
        if getattr(args, "resume", False) and not args.overrides and args.dataset is None:
            return None  # resume with the run's own config
        raise UserError("--preset is required (see `selfie presets`)")
    config = apply_overrides(get_preset(args.preset), args.overrides)
    if args.dataset is not None:
        config = replace(config, data=replace(config.data, dataset=args.dataset))
    part = getattr(config, section)
    for name in ("steps", "batch_size", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            part = replace(part, **{name: value})
    return validate(replace(config, **{section: part}))


def _run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        out=args.out,
        data_dir=args.data_dir,
        device=args.device,
        bf16=args.bf16,
        fp16=args.fp16,
        compile=args.compile,
        accum=args.accum,
        sync_bn=args.sync_bn,
        resume=args.resume,
        force=args.force,
        download=args.download,
        progress=sys.stderr.isatty(),
        workers=args.workers,
        unlabelled_dir=getattr(args, "unlabelled_dir", None),
        tensorboard=args.tensorboard,
    )


def cmd_pretrain(args: argparse.Namespace) -> None:
    from selfie.pretrain import pretrain

    config = _config(args)
    if args.out is None:
        if args.resume:
            raise UserError("--resume needs --out DIR, the run to continue")
        assert config is not None
        args.out = _default_out("pretrain", config.name)
    summary = pretrain(config, _run_options(args))
    if distributed.is_main():
        print(json.dumps(summary, indent=2))
        print(f"run folder: {args.out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from selfie.data.subsets import parse_amount
    from selfie.finetune import FinetuneSpec, finetune

    config = _config(args, "finetune")
    spec = None
    if not args.resume:
        if (args.labels is None and args.subset_file is None) or not (args.init or args.scratch):
            raise UserError(
                "finetune needs --labels or --subset-file, and one of --init CKPT or --scratch"
            )
        amount = None if args.labels is None else parse_amount(args.labels)
        spec = FinetuneSpec(amount, args.head, args.init, args.validation, args.subset_file)
    if args.out is None:
        if args.resume:
            raise UserError("--resume needs --out DIR, the run to continue")
        assert config is not None and spec is not None
        args.out = _default_out(f"finetune-{spec.arm}", config.name)
    summary = finetune(config, spec, _run_options(args))
    if distributed.is_main():
        print(json.dumps(summary, indent=2))
        print(f"run folder: {args.out}")


def cmd_experiment(args: argparse.Namespace) -> None:
    from selfie.data.subsets import parse_amount
    from selfie.experiment import Plan, Runtime, run_experiment
    from selfie.report import table_markdown

    config = _config(args)
    assert config is not None
    if args.pretrain_steps is not None:
        config = replace(config, pretrain=replace(config.pretrain, steps=args.pretrain_steps))
    if args.finetune_steps is not None:
        config = replace(config, finetune=replace(config.finetune, steps=args.finetune_steps))
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise UserError(f"--heads: unknown {unknown}; choose from {', '.join(HEADS)}")
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    plan = Plan(
        labels=tuple(parse_amount(t) for t in args.labels.split(",") if t.strip()),
        seeds=args.seeds,
        heads=heads,
        tune=args.tune,
        pretrained=args.pretrained,
        subset_files=tuple(args.subset_file),
        tune_visible=_fractions(args.tune_visible, "--tune-visible"),
        unlabelled_dir=args.unlabelled_dir,
    )
    out = args.out or _default_out("experiment", config.name)
    hint = shlex.join(["selfie", *args.argv, *([] if args.out else ["--out", str(out)])])
    runtime = Runtime(
        args.data_dir,
        args.device,
        args.bf16,
        args.download,
        sys.stderr.isatty(),
        hint,
        workers=args.workers,
        compile=args.compile,
    )
    cells = run_experiment(validate(config), plan, out, runtime)
    print(table_markdown(cells, heads[0], config.data.dataset))
    print(f"experiment folder: {out} (table.md, table.csv, figure.png, results.jsonl)")


def _fractions(text: str | None, flag: str) -> tuple[float, ...]:
    """ "0.75,0.5" -> (0.75, 0.5); None -> ()."""
    if text is None:
        return ()
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(
            f"{flag} {text}: give fractions separated by commas, e.g. 0.75,0.5"
        ) from None
    if not values or not all(0 < v < 1 for v in values):
        raise UserError(
            f"{flag} {text}: give fractions in (0, 1) separated by commas, e.g. 0.75,0.5"
        )
    return values


def cmd_report(args: argparse.Namespace) -> None:
    from selfie.report import write_report

    write_report(args.folder / "results.jsonl", args.folder)
    print((args.folder / "table.md").read_text())


def cmd_show_config(args: argparse.Namespace) -> None:
    from selfie.models.counts import parameter_counts

    config = _config(args)
    assert config is not None
    print(
        json.dumps({"config": config.to_dict(), "parameters": parameter_counts(config)}, indent=2)
    )


def cmd_presets(args: argparse.Namespace) -> None:
    width = max(map(len, PRESETS))
    for name, config in PRESETS.items():
        print(f"{name:<{width}}  {config.description}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from selfie.quickstart import quickstart

    quickstart(args.out or _default_out("quickstart", "digits"), bf16=args.bf16)


def cmd_data(args: argparse.Namespace) -> None:
    from selfie.data.check import check_dataset

    # `data_command` is always "check", the one sub-command so far.
    size = args.image_size or (224 if args.dataset == "imagenet224" else 32)
    result = check_dataset(args.dataset, args.data_dir, size, args.decode)
    print("\n".join(result.report))
    if result.problems:
        for problem in result.problems:
            print(f"problem: {problem}", file=sys.stderr)
        raise UserError(
            f"data check found {len(result.problems)} problem(s) in the {args.dataset} data; "
            "see the lines above"
        )
    print("ok: no problems found")


COMMANDS = {
    "pretrain": cmd_pretrain,
    "finetune": cmd_finetune,
    "experiment": cmd_experiment,
    "report": cmd_report,
    "show-config": cmd_show_config,
    "presets": cmd_presets,
    "quickstart": cmd_quickstart,
    "data": cmd_data,
    **USE_COMMANDS,
}


# Commands that run under torchrun; the others write shared files from every process.
DISTRIBUTED_COMMANDS = ("pretrain", "finetune")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Under torchrun, ranks other than 0 log warnings and errors only, and their error lines
    # name their rank (rank 0's read as in a single process).
    rank = distributed.env_rank() if distributed.launched_by_torchrun() else 0
    prefix = "selfie" if rank == 0 else f"selfie[rank {rank}]"
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # the experiment quotes its own command line to resume it
        logging.basicConfig(
            level=logging.WARNING if args.quiet or rank != 0 else logging.INFO,
            format="%(asctime)s %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
        if distributed.launched_by_torchrun() and args.command not in DISTRIBUTED_COMMANDS:
            raise UserError(
                f"`selfie {args.command}` does not run under torchrun; run its pretrain and "
                "finetune steps as `torchrun ... -m selfie pretrain|finetune`"
            )
        COMMANDS[args.command](args)
        # Under torchrun, leave together: a rank that tears gloo down while another is still
        # finishing can abort it ("terminate called without an active exception"). Only on
        # success: after an error the other ranks may be inside another collective.
        distributed.barrier()
    except Interrupted as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            f"{prefix}: interrupted (nothing to save yet; the last checkpoint stands)",
            file=sys.stderr,
        )
        return 130
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
