"""The commands' entry points: what the scripts (jobs/launch.py, pipelines/sweep.py, pipelines/report.py) and
the installed commands (gunn-launch, gunn-sweep, gunn-report) call.

Ctrl-C before a command has anything to save (while Python loads torch and the command's modules, seconds;
or while it checks its arguments) ends it quietly with status 130, not with a traceback. Once it runs,
the command's own handlers take over (checkpoint at the next batch, interrupt a sweep). ``import gunn``
does not import torch, so this module is reached within milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C


def launch() -> int:
    with _quiet_start():
        from gunn.cluster.launch import main
    return _run(main, "launch")


def sweep() -> int:
    with _quiet_start():
        from gunn.sweeps.driver import main
    return _run(main, "sweep")


def report() -> int:
    with _quiet_start():
        from gunn.sweeps.report import main
    return _run(main, "report")


@contextlib.contextmanager
def _quiet_start() -> Iterator[None]:
    """Ctrl-C while the block imports ends the process at once with status 130 (where SIGINT is not ignored)."""
    quiet = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if quiet:
        signal.signal(signal.SIGINT, _interrupted)
    try:
        yield
    finally:
        if quiet:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted(*_: object) -> None:
    # Not an exception: the code being imported may swallow one (a bare except around an optional import),
    # and the command would then go on. Nothing is being written yet.
    os._exit(INTERRUPTED)


def _run(main: Callable[[], int], name: str) -> int:
    try:
        return main()
    except KeyboardInterrupt:  # before the command's own handlers (checking its arguments, submitting)
        from gunn.cluster.commands import program

        print(f"{program(name)}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
