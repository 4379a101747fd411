"""The README's promises that can be checked mechanically."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_install_and_test_command():
    command = readme_test_command()
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = command.split(' && pip install -e ".[test]" && ')
    assert 'python -m pip install --quiet -e ".[test]"' in ci
    assert re.search(rf"^{re.escape(test)}$", ci, re.M), f"{test!r} is not a line of .ci/run"


def test_readme_example_runs():
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.+?)\n```", readme, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})
