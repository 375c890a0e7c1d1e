"""The run folder: config.json, metrics.jsonl, summary.json and checkpoints/ of one run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from selfie import distributed
from selfie.checkpoint import describe_write_error, fsync_dir
from selfie.config import Config, config_from_dict, validate
from selfie.errors import UserError
from selfie.tensorboard import TensorBoardLog
from selfie.tensorboard import check_available as check_tensorboard

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    """The commit of the source tree selfie runs from, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("selfie", "torch", "numpy", "scikit-learn", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def write_text_atomic(path: Path, text: str) -> None:
    """A reader (or a run resumed after a crash) sees the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        what, fix = describe_write_error(e)
        raise UserError(f"{what} while writing {path}; {fix} and run again") from None
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class RunFolder:
    def __init__(
        self, path: str | Path, resume: bool = False, force: bool = False, *, writer: bool = True
    ) -> None:
        """Open (with `writer`: check, create or clear) the run folder at `path`. A handle with
        writer=False touches nothing: torchrun's ranks other than 0 use one to read the
        checkpoints that rank 0 writes."""
        self.path = Path(path)
        # How the run was started (set by open_run), for the command that resumes it.
        self.options: RunOptions | None = None
        self.tensorboard: TensorBoardLog | None = None  # --tensorboard: records also to tb/
        if not writer:
            return
        exists = (self.path / "config.json").exists()
        if resume and not exists:
            raise UserError(f"--resume: {self.path} holds no run (no config.json); drop --resume")
        if exists and not resume and not force:
            raise UserError(
                f"{self.path} already holds a run; add --resume to continue it, "
                "--force to overwrite it, or choose another --out"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"cannot write to {self.path} ({e.strerror}); choose another --out"
            ) from None
        if force and not resume:
            for name in ("metrics.jsonl", "summary.json"):
                (self.path / name).unlink(missing_ok=True)
            for ckpt in self.checkpoints.glob("step_*.pt"):
                ckpt.unlink()
            shutil.rmtree(self.path / "tb", ignore_errors=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: dict[str, Any], run: dict[str, Any]) -> None:
        write_json(
            self.path / "config.json",
            {
                "config": config,
                "run": run,
                "git_commit": git_commit(),
                "versions": versions(),
                "command": sys.argv,
            },
        )

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def log(self, record: dict[str, Any]) -> None:
        path = self.path / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")  # one write: a kill leaves whole lines
        except OSError as e:
            what, fix = describe_write_error(e)
            raise UserError(
                f"{what} while writing {path}; {fix} and run again with --resume"
            ) from None
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        """Let go of the TensorBoard writer, if any."""
        if self.tensorboard is not None:
            self.tensorboard.close()

    def metrics(self) -> list[dict[str, Any]]:
        """The logged records. A last line cut short (a machine that lost power mid-append) is
        skipped with a warning: the resume that follows rewrites the records after its
        checkpoint anyway. A damaged line elsewhere is an error."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise UserError(
                        f"{path}: line {i + 1} is not JSON; repair or remove it"
                    ) from None
                log.warning("%s: skipping its last line, cut short: %r", path, line[:80])
        return records

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past `after_step` (written after the checkpoint a resume starts from),
        so the resumed run's metrics read as one uninterrupted run."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        write_text_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)


@dataclass(frozen=True)
class RunOptions:
    """How and where to run, as opposed to what (the Config)."""

    out: Path
    data_dir: str | None = None
    device: str = "auto"
    bf16: bool = False
    fp16: bool = False  # float16 autocast + GradScaler, for GPUs without bfloat16
    compile: bool = False  # torch.compile the training model
    accum: int = 1  # micro-batches per step on each process (gradient accumulation)
    sync_bn: bool = False  # BatchNorm statistics over all processes' shares (GPUs only)
    resume: bool = False
    force: bool = False
    download: bool = False
    progress: bool = True
    workers: int | None = None  # decoding processes of a streamed dataset; None: CPUs, <= 8
    # Pretraining's images when they live apart from the labelled ones (--unlabelled-dir);
    # recorded in config.json, and read back from it by a resume.
    unlabelled_dir: str | None = None
    tensorboard: bool = False  # also write the logged scalars to the run folder's tb/
    # The command that continues this run, quoted when it is interrupted; None: the
    # `selfie <kind> --resume` line resume_command builds. The experiment runner sets its own.
    resume_hint: str | None = None


def resume_command(kind: str, opts: RunOptions) -> str:
    """The command line that resumes a `kind` run started with `opts` (under torchrun: with
    torchrun's process counts). The options a resume does not read back from config.json
    (data folder, device, precision, accumulation, sync-bn, compile, workers) are repeated, so the
    resumed run reads the same data with the same numerics."""
    if opts.resume_hint:
        return opts.resume_hint
    parts = [*distributed.launch_prefix(), kind, "--resume", "--out", str(opts.out)]
    if opts.data_dir is not None:
        parts += ["--data-dir", opts.data_dir]
    if opts.device != "auto":
        parts += ["--device", opts.device]
    flags = {"--bf16": opts.bf16, "--fp16": opts.fp16, "--sync-bn": opts.sync_bn}
    parts += [flag for flag, on in flags.items() if on]
    if opts.accum != 1:
        parts += ["--accum", str(opts.accum)]
    if opts.compile:
        parts.append("--compile")
    if opts.workers is not None:
        parts += ["--workers", str(opts.workers)]
    if opts.tensorboard:
        parts.append("--tensorboard")
    return shlex.join(parts)


def resolve_config(config: Config | None, opts: RunOptions) -> tuple[Config, dict[str, Any]]:
    """The config to run, and the stored "run" section when resuming. With --resume the
    config is the run's own: a given config must equal it."""
    if not opts.resume:
        if config is None:
            raise UserError("--preset is required (see `selfie presets`)")
        return validate(config), {}
    path = Path(opts.out) / "config.json"
    if not path.exists():
        raise UserError(f"--resume: {opts.out} holds no run (no config.json); drop --resume")
    saved = json.loads(path.read_text())
    stored = config_from_dict(saved["config"])
    if config is not None and config != stored:
        a, b = flatten(config.to_dict()), flatten(stored.to_dict())
        diff = ", ".join(f"{k}={a[k]!r} (run has {b[k]!r})" for k in a if a[k] != b[k])
        raise UserError(f"--resume: the given settings differ from the run's: {diff}")
    return validate(stored), saved.get("run", {})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def open_run(
    config: Config,
    opts: RunOptions,
    extra: dict[str, Any] | None = None,
    on_open: Callable[[RunFolder], None] | None = None,
) -> RunFolder:
    """Create the run folder (or reopen it to resume) once the inputs are known to be good,
    so that bad input never leaves a half-made run behind. `extra` joins the "run" section;
    `on_open` writes any further files the run starts with.

    Under torchrun rank 0 alone does this; the other ranks wait for it (raising its error if
    it fails) and get a handle that writes nothing."""

    if opts.tensorboard:
        check_tensorboard()  # before anything is written

    def create() -> RunFolder:
        run = RunFolder(opts.out, resume=opts.resume, force=opts.force)
        if opts.tensorboard:
            run.tensorboard = TensorBoardLog(run.path / "tb")
        if not opts.resume:
            how = {
                "device": opts.device,
                "bf16": opts.bf16,
                "fp16": opts.fp16,
                "compile": opts.compile,
                "accum": opts.accum,
                "sync_bn": opts.sync_bn,
                "workers": opts.workers,
                "world_size": distributed.world_size(),
            }
            data = {"data_dir": opts.data_dir, "unlabelled_dir": opts.unlabelled_dir}
            run.write_config(config.to_dict(), {**how, **data, **(extra or {})})
        if on_open is not None:
            on_open(run)
        return run

    run = distributed.on_main(create) or RunFolder(opts.out, writer=False)
    run.options = opts
    return run
