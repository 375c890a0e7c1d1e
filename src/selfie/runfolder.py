"""The run folder: config.json, metrics.jsonl, summary.json and checkpoints/ of one run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from selfie.errors import UserError


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


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: str | Path, resume: bool = False, force: bool = False) -> None:
        self.path = Path(path)
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
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past `after_step` (written after the checkpoint a resume starts from),
        so the resumed run's metrics read as one uninterrupted run."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path / "metrics.jsonl")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)
