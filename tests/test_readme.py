"""The promises of the README and of the documentation pages (docs/*.md) that can be checked mechanically."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The README and the pages it maps: the commands they show are parsed, their links followed.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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


def layout_rows(page: str = "docs/development.md", heading: str = "## Source layout") -> list[tuple[str, set[Path]]]:
    """A layout table (by default the full one in docs/development.md; the README's short one with
    ``"README.md", "## Layout"``): each row's text and the paths it names. A row's first path sets its
    folder; bare names after it (``checkpoint.py``, ``profiles/``) are in that folder."""
    section = (ROOT / page).read_text().split(heading, 1)[1].split("\n## ", 1)[0]
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


def test_the_layout_tables_name_paths_that_exist():
    rows = layout_rows() + layout_rows("README.md", "## Layout")
    assert len(rows) >= 20
    missing = [f"{p.relative_to(ROOT)} (row: {line[:60]}...)" for line, named in rows for p in named if not p.exists()]
    assert not missing, "the layout tables name paths that do not exist: " + "; ".join(missing)


def test_every_module_of_the_package_is_in_the_layout_tables():
    named = set().union(*(paths for _, paths in layout_rows()))
    modules = [p for p in (ROOT / "gunn").rglob("*") if p.suffix in (".py", ".cpp")
               and p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in modules
                     if not any(p == n or n.is_dir() and p.is_relative_to(n) for n in named))
    assert not unnamed, "modules missing from the layout table of docs/development.md: " + ", ".join(unnamed)
    # The README's short table names folders; between them they hold every module too.
    short = set().union(*(paths for _, paths in layout_rows("README.md", "## Layout")))
    outside = sorted(str(p.relative_to(ROOT)) for p in modules
                     if not any(p == n or n.is_dir() and p.is_relative_to(n) for n in short))
    assert not outside, "modules under no row of the README's layout table: " + ", ".join(outside)


def _readme_commands(script: str) -> list[list[str]]:
    """The arguments of every ``python SCRIPT ...`` line in the bash blocks of the README and the docs pages,
    comments cut."""
    import shlex

    blocks = [block for page in PAGES for block in re.findall(r"```bash\n(.+?)\n```", page.read_text(), re.S)]
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


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link counts by its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings (those in code blocks are not headings)."""
    anchors, seen, fence = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.+)", line)):
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links: " + "; ".join(broken)
