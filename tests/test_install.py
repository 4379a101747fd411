"""The package installed as a user installs it (pip, not editable), used from a folder outside the checkout:
the entry points, the packaged presets and cluster profiles, a training run and a sweep, with nothing of the
checkout on the path."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project installed into a folder of its own (``pip install --target``, without dependencies: the test's
    environment has them). Built from a copy of the sources, so that the build leaves nothing in the checkout."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "gunn", source / "gunn", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-input", "--target", str(tmp / "site"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / "site"


def run(site: Path, command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` from ``cwd`` with the installed package on the path, and not the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0",
               XDG_CONFIG_HOME=str(cwd / "config"))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_installed_package_runs_its_commands_from_anywhere(site, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    imported = run(site, [sys.executable, "-c", "import gunn.cluster.launch, gunn.sweeps.driver; print(gunn.__file__)"],
                   work)
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()) == site / "gunn" / "__init__.py"  # not the checkout's
    for data in ("presets/digits.yaml", "cluster/profiles/dev.yaml", "cluster/profiles/example-gpu.yaml",
                 "layers/cpu_kernels.cpp"):
        assert (site / "gunn" / data).is_file(), data
    bin_ = site / "bin"
    assert {"gunn-launch", "gunn-sweep", "gunn-report"} <= {p.name for p in bin_.iterdir()}

    # The entry points, named as such in their help: there are no scripts beside an installed package.
    for name in ("gunn-launch", "gunn-sweep", "gunn-report"):
        helped = run(site, [str(bin_ / name), "--help"], work)
        assert helped.returncode == 0 and helped.stdout.startswith(f"usage: {name} "), helped.stdout + helped.stderr

    # Cluster profiles, found without submitting anything: a packaged one, then one of the user's folder.
    packaged = run(site, [str(bin_ / "gunn-launch"), "--cluster", "slurm", "--profile", "dev", "--print-config"], work)
    assert packaged.returncode == 0 and "name: digits" in packaged.stdout, packaged.stderr
    (work / "config" / "gunn" / "profiles").mkdir(parents=True)
    (work / "config" / "gunn" / "profiles" / "site.yaml").write_text("partition: site\ntime_min: 30\n")
    mine = run(site, [str(bin_ / "gunn-launch"), "--cluster", "slurm", "--profile", "site", "--print-config"], work)
    assert mine.returncode == 0, mine.stderr
    unknown = run(site, [sys.executable, "-m", "gunn.cluster.launch", "--cluster", "slurm", "--profile", "nosuch",
                         "--print-config"], work)
    assert unknown.returncode == 2, unknown.stderr
    assert (f"(looked for the file nosuch, {work / 'config' / 'gunn' / 'profiles' / 'nosuch.yaml'}, "
            f"{site / 'gunn' / 'cluster' / 'profiles' / 'nosuch.yaml'}); profiles: dev, example-gpu, site") \
        in unknown.stderr

    # A training run of the packaged digits preset, as a module (on tiny synthetic data: seconds, not a digits epoch).
    trained = run(site, [sys.executable, "-m", "gunn.cluster.launch", "digits", "optim.epochs=1", "data.name=synthetic",
                         "data.samples=128", "data.image_size=16", "data.classes=4", "optim.batch_size=16",
                         "logging.progress=false", "logging.mlflow=false"], work)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert re.search(r"finished: 1/1 epochs in (\S+)", trained.stdout), trained.stdout

    # A sweep of one tiny trial; the report command it prints rebuilds the report.
    (work / "space.yaml").write_text("model.expansion: [1]\n")
    swept = run(site, [str(bin_ / "gunn-sweep"), "--study", "custom", "--space", "space.yaml", "data.name=synthetic",
                       "data.samples=128", "data.image_size=16", "data.classes=4", "optim.batch_size=16",
                       "optim.epochs=1", "logging.model=false", "--dir", str(work / "sweep")], work, timeout=600)
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert (work / "sweep" / "report" / "report.csv").is_file()
    rebuild = shlex.split(re.search(r"\(rebuild: (.+)\)$", swept.stdout, re.M).group(1))
    assert rebuild[0] == "gunn-report", rebuild
    rebuilt = run(site, [str(bin_ / "gunn-report"), *rebuild[1:], "--out", str(work / "again")], work)
    assert rebuilt.returncode == 0 and "(custom), 1 trials" in rebuilt.stdout, rebuilt.stderr[-3000:]
