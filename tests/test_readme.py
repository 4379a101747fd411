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


def layout_rows() -> list[tuple[str, set[Path]]]:
    """The README's layout table: each row's text and the paths it names. A row's first path sets
    its folder; bare names after it (``checkpoint.py``, ``profiles/``) are in that folder."""
    section = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith(("| path", "| ---")):
            continue
        tokens = re.findall(r"`([^` ]+)`", line)
        paths = [t for t in tokens if re.fullmatch(r"[\w./-]+(\.py|\.cpp|/)", t) or "/" in t and (ROOT / t).exists()]
        folder = None
        named = set()
        for token in paths:
            if "/" in token.rstrip("/") or folder is None:
                path = ROOT / token
                folder = path if token.endswith("/") else path.parent
            else:
                path = folder / token
            named.add(path)
        rows.append((line, named))
    return rows


def test_the_layout_table_names_paths_that_exist():
    missing = [f"{p.relative_to(ROOT)} (row: {line[:60]}...)" for line, named in layout_rows() for p in named
               if not p.exists()]
    assert not missing, "the README's layout table names paths that do not exist: " + "; ".join(missing)


def test_every_module_of_the_package_is_in_the_layout_table():
    named = set().union(*(paths for _, paths in layout_rows()))
    modules = [p for p in (ROOT / "gunn").rglob("*") if p.suffix in (".py", ".cpp")
               and p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in modules
                     if not any(p == n or n.is_dir() and p.is_relative_to(n) for n in named))
    assert not unnamed, "modules missing from the README's layout table: " + ", ".join(unnamed)


def _readme_commands(script: str) -> list[list[str]]:
    """The arguments of every ``python SCRIPT ...`` line in the README's bash blocks, comments cut."""
    import shlex

    blocks = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
    return [shlex.split(line, comments=True)[2:] for block in blocks for line in block.splitlines()
            if line.startswith(f"python {script}")]


def test_every_launch_command_of_the_readme_parses_and_prints_its_configuration(monkeypatch, capsys):
    from gunn.cluster import launch

    monkeypatch.chdir(ROOT)
    commands = _readme_commands("jobs/launch.py")
    assert len(commands) >= 8
    for args in commands:
        launch.parse_args(args)  # exits 2 on a command line it cannot parse
        if "my-run.yaml" in args or "mysite" in args:  # the reader's own files
            continue
        assert launch.main([*args, "--print-config"]) == 0, (args, capsys.readouterr().err)


def test_every_sweep_command_of_the_readme_parses():
    from gunn.sweeps import driver

    commands = [args for args in _readme_commands("pipelines/sweep.py") if "--resume" not in args]
    assert len(commands) >= 5
    for args in commands:
        parsed = driver.parse_args(args)
        assert parsed.study and all("=" in o for o in parsed.overrides), args
