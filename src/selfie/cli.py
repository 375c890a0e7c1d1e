"""The `selfie` command line: parses arguments, builds a config, calls one function.

Bad input raises UserError; `main` prints it as one line on stderr and returns 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from selfie.config import PRESETS, Config, apply_overrides, get_preset, validate
from selfie.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


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


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="dataset root; for CIFAR-10 the folder that holds cifar-10-batches-py/ "
        "(default: data/cifar10); unused for the built-in digits",
    )
    p.add_argument("--download", action="store_true", help="fetch the dataset if missing")
    p.add_argument("--out", type=Path, metavar="DIR", help="run folder (default: runs/...)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps (overrides the preset)")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="images per step; the preset's peak LR is kept (no linear scaling)",
    )
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default: the preset's)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on CPU/GPU)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="selfie",
        description="Selfie self-supervised pretraining (Trinh, Luong, Le 2019): pretrain a "
        "ResNet on unlabelled images by picking the right patch for each masked location.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pretrain", help="pretrain P and A on images without labels")
    _add_config_args(p, preset_required=False)
    _add_run_args(p)

    p = sub.add_parser("show-config", help="print the resolved config and parameter counts")
    _add_config_args(p)

    sub.add_parser("presets", help="list the presets")

    p = sub.add_parser("quickstart", help="the main job on the built-in digits, no set-up")
    p.add_argument("--out", type=Path, metavar="DIR", help="run folder (default: runs/...)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    return parser


def _config(args: argparse.Namespace) -> Config | None:
    if args.preset is None:
        if getattr(args, "resume", False) and not args.overrides:
            return None  # resume with the run's own config
        raise UserError("--preset is required (see `selfie presets`)")
    config = apply_overrides(get_preset(args.preset), args.overrides)
    pre = config.pretrain
    for name, value in (
        ("steps", getattr(args, "steps", None)),
        ("batch_size", getattr(args, "batch_size", None)),
        ("seed", getattr(args, "seed", None)),
    ):
        if value is not None:
            pre = replace(pre, **{name: value})
    return validate(replace(config, pretrain=pre))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from selfie.pretrain import RunOptions, pretrain

    config = _config(args)
    if args.out is None:
        if args.resume:
            raise UserError("--resume needs --out DIR, the run to continue")
        assert config is not None
        args.out = _default_out("pretrain", config.name)
    summary = pretrain(
        config,
        RunOptions(
            out=args.out,
            data_dir=args.data_dir,
            device=args.device,
            bf16=args.bf16,
            resume=args.resume,
            force=args.force,
            download=args.download,
            progress=sys.stderr.isatty(),
        ),
    )
    print(json.dumps(summary, indent=2))
    print(f"run folder: {args.out}")


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


COMMANDS = {
    "pretrain": cmd_pretrain,
    "show-config": cmd_show_config,
    "presets": cmd_presets,
    "quickstart": cmd_quickstart,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="%(asctime)s %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"selfie: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
