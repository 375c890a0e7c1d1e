"""Helpers shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfie import cli
from selfie.runfolder import RunFolder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI in-process (quiet): exit code, stdout, stderr."""
    code = cli.main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_pretrain_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    """`selfie pretrain --preset tiny` on the CPU with `flags`: exit 2, one stderr line
    containing `needle`, and no run folder written."""
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--device", "cpu", "--out", str(out), *flags]
    code, _, err = run_cli(args, capsys)
    err = err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def open_test_run(path: Path, resume: bool = False) -> RunFolder:
    """A run folder for engine tests: a fresh one gets a minimal config.json."""
    run = RunFolder(path, resume=resume)
    if not resume:
        run.write_config({"name": "test"}, {})
    return run
