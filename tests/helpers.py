"""Helpers shared by the test modules."""

from __future__ import annotations

import pytest

from selfie import cli


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI in-process (quiet): exit code, stdout, stderr."""
    code = cli.main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err
