"""Exceptions the CLI prints as one line on stderr, exiting with their `exit_code`."""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 2


class Interrupted(UserError):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; the message says the
    step reached and the command that resumes. The exit code is the shell's 128 + signal
    number (130, 143), so scripts and schedulers see an interrupted job, not bad input."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)
