"""The command line in this process, for requests answered before anything runs (a
refusal, ``--help``): a subprocess would add only the interpreter's start-up.
tests/test_cli.py runs bad input through ``python -m supervisor`` as a user does."""

from __future__ import annotations

import contextlib
import io
import subprocess

from supervisor import cli


def refused_here(*args: str) -> subprocess.CompletedProcess[str]:
    """``supervisor ARGS`` run by :func:`supervisor.cli.main` here: its status, stdout and
    stderr, as :func:`subprocess.run` would give them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(args))
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())
