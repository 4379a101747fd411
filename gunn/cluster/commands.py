"""How a user runs the project's commands, for help texts and the commands that messages print; and how the
commands write their messages (``write_stderr``, ``plain_warnings``).

In a checkout (an editable install, or the checkout on PYTHONPATH) these are its scripts, as the
README documents them: ``python jobs/launch.py``, ``python pipelines/sweep.py``, ``python
pipelines/report.py``. An installed package has no scripts beside it: there they are the entry
points ``gunn-launch``, ``gunn-sweep`` and ``gunn-report``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# The checkout this package belongs to, if it is one (where jobs/ and pipelines/ are).
CHECKOUT = Path(__file__).resolve().parents[2]
# Command -> (the checkout's script, the installed entry point).
COMMANDS = {
    "launch": ("jobs/launch.py", "gunn-launch"),
    "sweep": ("pipelines/sweep.py", "gunn-sweep"),
    "report": ("pipelines/report.py", "gunn-report"),
}
def command(name: str, absolute: bool = False) -> list[str]:
    """The words that run command ``name`` from the current folder: ``python SCRIPT`` in a checkout (the
    script's path relative to the current folder when it is below it, unless ``absolute``), else its entry point."""
    script, entry_point = COMMANDS[name]
    path = CHECKOUT / script
    if not path.is_file() or _invoked_as(entry_point):
        return [entry_point]
    here = Path.cwd()
    return ["python", str(path if absolute or not path.is_relative_to(here) else path.relative_to(here))]


def program(name: str) -> str:
    """The name of command ``name`` in its help: ``python SCRIPT`` in a checkout, else its entry point."""
    script, entry_point = COMMANDS[name]
    return f"python {script}" if (CHECKOUT / script).is_file() and not _invoked_as(entry_point) else entry_point


def _invoked_as(entry_point: str) -> bool:
    """Whether this process was started as ``entry_point`` (also an editable install's, beside a checkout)."""
    return bool(sys.argv) and Path(sys.argv[0]).name == entry_point


def write_stderr(line: str) -> None:
    """Writes ``line`` to stderr at once, in one unbuffered write: the commands' notices and warnings that are
    not Python warnings. Safe in a signal handler, which may interrupt a ``print`` to stderr (a progress bar's),
    where a second buffered write would fail."""
    os.write(sys.stderr.fileno(), f"{line}\n".encode())


def plain_warnings() -> None:
    """Warnings print as one line, ``warning: MESSAGE``, not with the file, line and source that raised them:
    a command's notices (a lock taken over, a checkpoint skipped) are for its user, not its developer."""
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        stream = sys.stderr if file is None else file
        try:
            stream.write(f"warning: {message}\n")
        except (OSError, ValueError):
            pass

    warnings.showwarning = show
