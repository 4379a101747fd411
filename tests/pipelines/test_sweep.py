"""The sweeps (gunn/sweeps/; pipelines/sweep.py and pipelines/report.py): Ray Tune sweeps over the engine,
MLflow parent/child runs."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from gunn import config as cfgmod
from gunn.sweeps import driver, studies

REPO = Path(__file__).resolve().parents[2]
SWEEP = [sys.executable, str(REPO / "pipelines" / "sweep.py")]
REPORT = [sys.executable, str(REPO / "pipelines" / "report.py")]
# No MLflow model export in the trials of the sweeps (it costs seconds a trial): a trial runs the engine, whose
# export tests/train/test_mlflow_model.py checks.
NO_MODEL = "logging.model=false"
TINY = ["data.name=synthetic", "data.samples=128", "data.image_size=16", "data.classes=4", "optim.batch_size=16",
        NO_MODEL]


def env() -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    values.update(PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    return values


def run(command: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def sweep_runs(cwd: Path, sweep_dir: Path) -> tuple[object, list[object]]:
    from gunn.train.tracking import journaled_run_id

    mlflow = client(cwd)
    parent = mlflow.get_run(journaled_run_id(sweep_dir, mlflow.tracking_uri))  # the parent is journaled there
    children = mlflow.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, children


def ray_processes(folder: Path) -> list[str]:
    """Command lines of the processes that use Ray's folder ``folder`` (read from /proc, signalled by no one)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in command:
            found.append(f"{proc.name}: {command[:200]}")
    return found


PEERS = ["gunn_tiny", "sunn_tiny", "torchvision.mobilenet_v3_small"]


@pytest.mark.slow
def test_a_peers_sweep_nests_its_trials_and_writes_the_report_and_the_parents_summary(tmp_path):
    sweep_dir = tmp_path / "sweep"
    driver = subprocess.Popen(SWEEP + ["--study", "peers", "--models", *PEERS, *TINY, "optim.epochs=1",
                                       "--dir", str(sweep_dir)],
                              cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = driver.communicate(timeout=900)
    done = subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # One line per trial event, with the count of trials done; none of Ray's own chatter.
    for model in PEERS:
        trial = f"model={model}_seed=0"
        assert re.search(rf"^\[[0-2]/3 done\] {trial}: started$", done.stdout, re.M), done.stdout
        assert re.search(rf"^\[[0-2]/3 done\] {trial}: epoch 1/1, eval top-1 error [0-9.]+%$", done.stdout, re.M)
        assert re.search(rf"^\[[1-3]/3 done\] {trial}: finished$", done.stdout, re.M)
    for noise in ("TensorBoard", "Token authentication", "Started a local Ray instance", "Tuner.restore"):
        assert noise not in done.stdout + done.stderr
    # The sweep's own Ray is gone, with its folder.
    ray_folder = Path(tempfile.gettempdir()) / f"gunn-ray-{driver.pid}"
    assert not ray_folder.exists() and not ray_processes(ray_folder)
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert parent.info.status == "FINISHED" and parent.data.tags["study"] == "peers"
    assert sorted(c.data.params["model.name"] for c in children) == sorted(PEERS)
    assert all(c.info.status == "FINISHED" and c.data.tags["study"] == "peers" for c in children)
    assert all(c.data.params["data.name"] == "synthetic" and "eval_top1_error" in c.data.metrics for c in children)
    # Each run says its model's cost; diagnostics sit under diag/, after the errors in MLflow's charts.
    tags = {c.data.params["model.name"]: c.data.tags for c in children}
    assert tags["gunn_tiny"]["parameters"] == tags["sunn_tiny"]["parameters"] == "104884"  # 3 channels, 4 classes
    assert float(tags["gunn_tiny"]["gmac"]) == float(tags["sunn_tiny"]["gmac"]) > 0
    gunn_metrics = next(c.data.metrics for c in children if c.data.params["model.name"] == "gunn_tiny")
    assert any(k.startswith("diag/") and k.endswith("/collapsed_pairs") for k in gunn_metrics)
    assert not any(k.startswith("singularity/") for k in gunn_metrics)
    with open(sweep_dir / "report" / "report.csv") as f:
        rows = {row["configuration"]: row for row in csv.DictReader(f)}
    assert set(rows) == {f"model={m}" for m in PEERS}
    assert rows["model=gunn_tiny"]["mode"] == "gunn" and rows["model=sunn_tiny"]["mode"] == "sunn"
    assert rows["model=gunn_tiny"]["parameters"] == rows["model=sunn_tiny"]["parameters"] == "104884"
    assert rows["model=gunn_tiny"]["gmac_per_image"] == rows["model=sunn_tiny"]["gmac_per_image"]
    assert int(rows["model=torchvision.mobilenet_v3_small"]["parameters"]) == int(
        tags["torchvision.mobilenet_v3_small"]["parameters"])
    assert all(float(rows[f"model={m}"]["collapsed_pairs"]) >= 0 and float(rows[f"model={m}"]["participation_ratio"]) >= 1
               for m in ("gunn_tiny", "sunn_tiny"))
    artifacts = {a.path for a in client(tmp_path).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.csv", "report/curves.png"} <= artifacts
    assert "| model=gunn_tiny | gunn |" in done.stdout and "| model=sunn_tiny | sunn |" in done.stdout
    # The parent run holds the comparison as metrics, one per configuration.
    summary = parent.data.metrics
    for model in PEERS:
        assert summary[f"eval_top1_error_mean/{model}"] == float(rows[f"model={model}"]["top1_error_mean"])
        assert summary[f"parameters/{model}"] == float(rows[f"model={model}"]["parameters"])


@pytest.mark.slow
def test_a_partitions_sweep_compares_segment_widths_with_sunn_as_reference(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run(SWEEP + ["--study", "partitions", "--widths", "8", "16", *TINY, "optim.epochs=1",
                        "--dir", str(sweep_dir)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, children = sweep_runs(tmp_path, sweep_dir)
    segments = sorted(c.data.params["model.segments"] for c in children)
    assert segments == ["[2, 3, 4]", "[4, 4, 4]", "[4, 6, 8]"]  # SUNN with the model's own segments, as used
    # Named after what the study varies: the segment width.
    assert sorted(c.info.run_name for c in children) == ["mode=sunn_seed=0", "width=16_seed=0", "width=8_seed=0"]
    with open(sweep_dir / "report" / "report.csv") as f:
        widths = {(row["configuration"], row["mode"], row["segment_width"]) for row in csv.DictReader(f)}
    # The rows are labelled by what the study varied, not by the segment counts that follow from it.
    assert widths == {("mode=sunn", "sunn", "8/12/16"), ("width=8", "gunn", "8/8/8"), ("width=16", "gunn", "16/16/16")}
    assert (sweep_dir / "report" / "error_vs_width.png").stat().st_size > 0

    # The same report, rebuilt from MLflow alone (found by the sweep's name).
    rebuilt = run(REPORT + ["sweep", "--out", str(tmp_path / "again")], tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "(partitions), 3 trials" in rebuilt.stdout
    assert (tmp_path / "again" / "report.csv").read_text() == (sweep_dir / "report" / "report.csv").read_text()


def refused(args: list[str], folder: Path, capsys, monkeypatch) -> str:
    """The error output of the sweep command ``args`` run in this process from ``folder``, which must refuse it
    (exit status 2). (A real process says it the same way: test_a_refused_sweep_says_why_in_one_line...)"""
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as exited:
        sys.exit(driver.main(args))
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    return err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--study", "partitions", "--widths", "5"], "segment width 5 does not divide the GUNN layer width(s)"),
        (["--study", "partitions"], "--study partitions needs --widths"),
        (["--study", "partitions", "--widths", "0"], "segment width 0 is not positive"),
        (["--study", "partitions", "--widths", "-4"], "segment width -4 is not positive"),
        (["--study", "partitions", "--widths", "4", "4"], "--widths: 4 given twice"),
        (["--study", "sunn-vs-gunn", "--seeds", "0", "0"], "--seeds: 0 given twice"),
        (["--study", "sunn-vs-gunn", "optim.lr=-1"], "optim.lr must be >= 0.0, got -1.0"),
        (["--study", "custom", "--space", "missing.yaml"], "--space missing.yaml"),
        (["--study", "sunn-vs-gunn", "runtime.seed=5"],
         "runtime.seed=5: runtime.seed is set by the sweep for every trial (use --seeds)"),
        (["--study", "sunn-vs-gunn", "checkpoint.dir=x"], "checkpoint.dir=x: checkpoint.dir is set by the sweep"),
        (["--study", "sunn-vs-gunn", "logging.run_name=x"], "logging.run_name=x: logging.run_name is set by the sweep"),
        (["--study", "sunn-vs-gunn", "model.mode=gunn"], "model.mode=gunn: model.mode is what --study sunn-vs-gunn varies"),
        (["--study", "partitions", "--widths", "8", "model.segments=[2,2,2]"],
         "model.segments=[2,2,2]: model.segments is what --study partitions varies"),
    ],
)
def test_bad_sweeps_are_refused_before_ray_starts(tmp_path, capsys, monkeypatch, args, message):
    assert message in refused(args, tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_a_refused_sweep_says_why_in_one_line_without_a_traceback(tmp_path):
    done = run(SWEEP + ["--study", "partitions", "--widths", "5"], tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --widths: segment width 5 does not divide") and done.stderr.count("\n") == 1
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("args,message", [
    (["--asha", "--asha-grace", "0"], "--asha-grace must be at least 1, got 0"),
    (["--ray-cpus", "-2"], "--ray-cpus must be at least 0, got -2"),
    (["--max-concurrent", "-3"], "--max-concurrent must be at least 0, got -3"),
    (["--max-failures", "-1"], "--max-failures must be at least 0, got -1"),  # Tune: retry for ever
    (["--cpus-per-trial", "64", "--ray-cpus", "2"], "--cpus-per-trial 64 exceeds the 2 CPUs that Ray may use here "
                                                    "(--ray-cpus): no trial could start"),
    (["--widths", "8"], "--widths is for --study partitions; --study sunn-vs-gunn does not use it"),
    (["--space", "space.yaml"], "--space is for --study custom; --study sunn-vs-gunn does not use it"),
    (["--asha", "--asha-grace", "3", "optim.epochs=2"], "error: --asha-grace 3 exceeds the 2 epochs of every trial"),
])
def test_sweep_options_that_cannot_work_are_refused_at_once(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        sys.exit(driver.main(["--study", "sunn-vs-gunn", *TINY, *args, "--dir", str(tmp_path / "sweep")]))
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_sweep_directory_holds_one_sweep(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "sweep.yaml").write_text("study: sunn-vs-gunn\n")  # another sweep's, finished or running
    done = run(SWEEP + ["--study", "sunn-vs-gunn", *TINY, "--dir", str(taken)], tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: --dir {taken} holds another sweep already: continue that one with --resume {taken}, or " \
           "choose a new --dir" in done.stderr
    assert [p.name for p in taken.iterdir()] == ["sweep.yaml"]
    # Two sweeps started in the same second: the default name, taken, is passed over; a chosen one is not.
    default = tmp_path / "sweeps" / "sunn-vs-gunn-digits-20261206-120000"
    assert driver._claim(default, unique=True) == default
    assert driver._claim(default, unique=True) == default.with_name(default.name + "-2")
    with pytest.raises(driver.ConfigError, match="holds another sweep already"):
        driver._claim(default, unique=False)
    empty = tmp_path / "made-for-it"
    empty.mkdir()
    assert driver._claim(empty, unique=False) == empty and (empty / "sweep.yaml").is_file()


@pytest.mark.parametrize("preset,valid", [([], "gunn_tiny (widths [32, 48, 64]): 1 2 4 8 16"),
                                          (["gunn15-cifar10"], "gunn15 (widths [240, 300, 360]): 1 2 3 4 5 6 10 12 15 20 30 60")])
def test_refused_partitions_name_the_widths_that_divide_every_layer_of_the_preset(tmp_path, capsys, monkeypatch,
                                                                                  preset, valid):
    for widths in ([], ["--widths", "7"]):
        err = refused([*preset, "--study", "partitions", *widths], tmp_path, capsys, monkeypatch)
        assert f"widths that divide every GUNN layer of {valid}\n" in err, err


@pytest.mark.parametrize(
    "space,message",
    [
        ("runtime.seed: [0, 1]", "runtime.seed is set by the sweep for every trial"),
        ("checkpoint.dir: [a, b]", "checkpoint.dir is set by the sweep for every trial"),
        ("logging.diagnostics: [true, false]", "logging.diagnostics is set by the sweep for every trial"),
        ("model.expansion: [1, 2, 1]", "model.expansion lists 1 twice"),
        ("name: [a/b, a-b]", "two trials would share the name and run directory name=a-b_seed=0"),
        ("optim.batch_size: [64, 4000]", "error: trial batch_size=4000_seed=0: optim.batch_size=4000 is larger than "
                                         "the 1438 training images of digits"),
    ],
)
def test_refused_custom_spaces(tmp_path, capsys, monkeypatch, space, message):
    (tmp_path / "space.yaml").write_text(space + "\n")
    assert message in refused(["--study", "custom", "--space", "space.yaml"], tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "sweeps").exists()


def saved_sweep(folder: Path, **changes) -> Path:
    """A sweep directory with its saved settings, as a started sweep leaves it (with ``changes``)."""
    folder.mkdir()
    settings = {"format": driver.FORMAT, "study": "sunn-vs-gunn", "seeds": [0, 1], "widths": None, "space": None, "dir": str(folder),
                "cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 0, "max_failures": 1, "asha": False,
                "asha_grace": 1, "ray_cpus": 0, "preset": None, "overrides": ["optim.epochs=2"]}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(settings | changes))
    return folder


def test_resume_refuses_a_sweep_directory_of_a_newer_format_naming_both_formats(tmp_path, capsys, monkeypatch):
    folder = saved_sweep(tmp_path / "sweep", format=driver.FORMAT + 1)
    err = refused(["--resume", str(folder)], tmp_path, capsys, monkeypatch)
    assert (f"error: --resume {folder}: the sweep directory is in format {driver.FORMAT + 1}, written by a newer gunn; "
            f"this gunn reads sweep directories up to format {driver.FORMAT}") in err


def test_a_sweep_directory_saved_before_formats_were_numbered_resumes_as_format_1(tmp_path):
    folder = saved_sweep(tmp_path / "sweep")
    settings = yaml.safe_load((folder / "sweep.yaml").read_text())
    del settings["format"]
    (folder / "sweep.yaml").write_text(yaml.safe_dump(settings))
    args = driver.parse_args(["--resume", str(folder), "--seeds", "0", "1"])
    assert args.study == "sunn-vs-gunn" and not hasattr(args, "format")


def test_refused_resume_with_other_settings_lists_each_with_saved_and_given_values(tmp_path, capsys, monkeypatch):
    folder = saved_sweep(tmp_path / "sweep")
    err = refused(["--resume", str(folder), "optim.epochs=3", "--seeds", "0", "--study", "residual", "--cluster",
                   "local"], tmp_path, capsys, monkeypatch)
    assert "these arguments differ: --seeds: saved [0, 1], given [0]; --study: saved sunn-vs-gunn, given residual; " \
           "overrides: saved ['optim.epochs=2'], given ['optim.epochs=3']" in err
    assert sorted(p.name for p in folder.iterdir()) == ["sweep.yaml"]


def test_refused_resume_spares_where_to_run_and_repeated_settings(tmp_path):
    folder = saved_sweep(tmp_path / "sweep")
    args = driver.parse_args(["digits", "--resume", str(folder), "--seeds", "0", "1", "optim.epochs=2",
                                    "--dir", str(folder), "--cluster", "slurm", "--nodes", "2", "--verbose"])
    assert (args.seeds, args.overrides, args.cluster, args.nodes, args.verbose) == ([0, 1], ["optim.epochs=2"],
                                                                                    "slurm", 2, True)
    with pytest.raises(SystemExit):
        driver.parse_args(["--resume", str(folder), "--seeds", "0"])  # the default, but not the saved value
    # How many trials run at once may change; when not given, the saved value holds.
    assert driver.parse_args(["--resume", str(folder), "--max-concurrent", "1"]).max_concurrent == 1
    assert driver.parse_args(["--resume", str(folder)]).max_concurrent == 0


@pytest.mark.parametrize("args,message", [
    (["--study", "peers"], "--study peers needs --models, the models to compare"),
    (["--study", "peers", "--models", "gunn_tiny", "resnet1100"], "--models: unknown model 'resnet1100' (did you mean"),
    (["--study", "peers", "--models", "gunn_tiny", "torchvision.resnet1"],
     "--models: unknown model 'torchvision.resnet1': torchvision has no classification model"),
    (["--study", "peers", "--models", "gunn_tiny", "gunn_tiny"], "--models: gunn_tiny given twice"),
    (["--study", "paper-cifar", "--models", "gunn18"], "--models: gunn18 not in the paper's rows of --study paper-cifar; "
                                                       "they are: resnet110 wrn28_10"),
    (["--study", "sunn-vs-gunn", "--models", "gunn15"],
     "--models is for --study peers or paper-cifar or paper-imagenet; --study sunn-vs-gunn does not use it"),
    (["--study", "peers", "--models", "gunn_tiny", "model.name=gunn15"],
     "model.name=gunn15: model.name is what --study peers varies"),
    (["--study", "peers", "--models", "gunn_tiny", "torchvision.resnet18", "model.mode=sunn"],
     "trial model=torchvision.resnet18_seed=0: model: torchvision.resnet18 has no setting 'mode'"),
])
def test_bad_model_studies_are_refused_at_once(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        sys.exit(driver.main([*args, *TINY, "--dir", str(tmp_path / "sweep")]))
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_the_paper_studies_train_the_rows_of_the_papers_tables_that_gunn_builds(tmp_path, capsys):
    from gunn.models import is_model, paper

    def models(study: str, picked: list[str] | None) -> list[str]:
        points = studies.get_study(study).points(cfgmod.load(), models=picked)
        return [overrides["model.name"] for _, overrides in points]

    cifar = models("paper-cifar", None)
    assert cifar == ["resnet110", "wrn28_10", "wrn40_10", "resnext29_16x64d", "densenet_bc190", "gunn15", "gunn24",
                     "sunn15", "sunn24"]
    assert all(paper.published(m, "cifar100") is not None for m in cifar)
    imagenet = models("paper-imagenet", None)
    rows = [r.model for r in paper.results("imagenet", buildable=True)]
    assert imagenet == [m for m in rows if is_model(m)] and {"gunn18", "sunn18", "wide_gunn18"} <= set(imagenet)
    if len(imagenet) < len(rows):  # without timm, its rows are left out and said so
        assert "note: --study paper-imagenet leaves out timm.dpn98, timm.seresnext101_32x4d" in capsys.readouterr().err
    assert models("paper-cifar", ["gunn15", "wrn28_10"]) == ["wrn28_10", "gunn15"]  # the paper's order
    args = driver.parse_args(["--study", "peers", "--models", "gunn_tiny", "torchvision.resnet18", *TINY])
    trials = studies.trial_configs(args, tmp_path, "parent", "sqlite:///unused.db", check_device=False)
    assert [t["key"] for t in trials] == ["model=gunn_tiny_seed=0", "model=torchvision.resnet18_seed=0"]
    assert [t["config"]["model"]["name"] for t in trials] == ["gunn_tiny", "torchvision.resnet18"]


def test_trials_run_seed_major_so_that_configurations_share_the_load_evenly(tmp_path):
    args = driver.parse_args(["--study", "sunn-vs-gunn", "--seeds", "0", "1", *TINY])
    trials = studies.trial_configs(args, tmp_path, "parent", "sqlite:///unused.db", check_device=False)
    assert [t["key"] for t in trials] == ["mode=sunn_seed=0", "mode=gunn_seed=0", "mode=sunn_seed=1",
                                          "mode=gunn_seed=1"]


def test_a_study_is_one_registered_function_that_the_command_line_and_the_trials_know(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(studies, "_STUDIES", dict(studies._STUDIES))  # registered for this test only
    rates = studies.StudyOption("--rates", "learning rates to compare", type=float, nargs="+")

    @studies.register_study("learning-rate", options=(rates,))
    def learning_rate(base, *, rates):
        """The learning rate over --rates, at the preset's recipe otherwise."""
        if not rates:
            raise driver.ConfigError("--study learning-rate needs --rates")
        return [({"lr": rate}, {"optim.lr": rate}) for rate in rates]

    with pytest.raises(SystemExit):
        driver.parse_args(["--help"])
    helped = capsys.readouterr().out
    assert "learning-rate   The learning rate over --rates, at the preset's recipe otherwise." in helped
    assert "learning-rate: learning rates to compare" in " ".join(helped.split())
    args = driver.parse_args(["--study", "learning-rate", "--rates", "0.1", "0.05", "--seeds", "0", "1", *TINY])
    trials = studies.trial_configs(args, tmp_path, "parent", "sqlite:///unused.db", check_device=False)
    assert [t["key"] for t in trials] == ["lr=0.1_seed=0", "lr=0.05_seed=0", "lr=0.1_seed=1", "lr=0.05_seed=1"]
    assert [t["config"]["optim"]["lr"] for t in trials] == [0.1, 0.05, 0.1, 0.05]
    assert all(t["config"]["logging"]["study"] == "learning-rate" for t in trials)
    # Its option is its own; the other studies' options are not.
    with pytest.raises(SystemExit):
        driver.parse_args(["--study", "sunn-vs-gunn", "--rates", "0.1", *TINY])
    assert "--rates is for --study learning-rate; --study sunn-vs-gunn does not use it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        driver.parse_args(["--study", "learning-rate", "--widths", "8", *TINY])
    assert "--widths is for --study partitions; --study learning-rate does not use it" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already registered"):
        studies.register_study("learning-rate")(learning_rate)


def _python(command: str) -> list[str]:
    """A printed ``python ...`` command, run with this Python."""
    words = shlex.split(command)
    return [sys.executable, *words[1:]] if words[0] == "python" else words


@pytest.mark.slow
def test_a_sweep_started_while_mlflow_is_down_is_sent_by_sync_with_its_trials_under_its_parent(server, tmp_path):
    from mlflow.tracking import MlflowClient

    from gunn.train.tracking import journaled_run_id

    server.stop()
    sweep_dir = tmp_path / "sweep"
    done = run(SWEEP + ["--study", "sunn-vs-gunn", *TINY, "optim.epochs=1", f"logging.tracking_uri={server.uri}",
                        "logging.experiment=sweeps-offline", "--dir", str(sweep_dir)], tmp_path)
    # The trials trained; what MLflow missed is named, with the commands that send it and build the report.
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list(sweep_dir.glob("runs/*/model-final.pt"))) == 2
    assert "Ray's logs" not in done.stdout + done.stderr  # kept only when a trial failed
    syncs = re.findall(r"send them with: (python -m gunn\.train\.tracking sync .+)$", done.stderr, re.M)
    assert len(syncs) == 3 and shlex.split(syncs[0])[-1] == str(sweep_dir), done.stderr  # the parent first
    rebuild = re.search(r"^warning: no report: .* build it with: (.+)$", done.stderr, re.M).group(1)

    server.start()
    for command in syncs:
        synced = run(_python(command), tmp_path, timeout=120)
        assert synced.returncode == 0, synced.stdout + synced.stderr
    client = MlflowClient(server.uri)
    parent = client.get_run(journaled_run_id(sweep_dir, server.uri))
    assert parent.data.params["study"] == '"sunn-vs-gunn"' and parent.data.params["seeds"] == "[0]"
    assert parent.data.tags["study"] == "sunn-vs-gunn" and parent.data.tags["sweep"] == "sweep"
    assert parent.info.status == "FAILED"  # ended without its report, as any sweep MLflow missed records of
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["mode=gunn_seed=0", "mode=sunn_seed=0"]
    assert all(c.info.status == "FINISHED" and "eval_top1_error" in c.data.metrics for c in children)
    rebuilt = run(_python(rebuild), tmp_path)
    assert rebuilt.returncode == 0 and "(sunn-vs-gunn), 2 trials" in rebuilt.stdout, rebuilt.stderr[-2000:]


def start_sweep(args: list[str], cwd: Path, nice: bool = False) -> subprocess.Popen:
    """A sweep's driver in a process group of its own, as a shell starts a command in a terminal (``nice``: it and its Ray
    at the lowest CPU priority, running on what the test's own work leaves idle)."""
    return subprocess.Popen((["nice", "-n", "19"] if nice else []) + SWEEP + args, cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(driver: subprocess.Popen, sweep_dir: Path, pattern: str, timeout: float = 600) -> list[Path]:
    deadline = time.monotonic() + timeout
    while not list(sweep_dir.glob(pattern)):
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {pattern} in {timeout} s"
        time.sleep(0.2)
    return list(sweep_dir.glob(pattern))


@pytest.mark.slow
def test_sigterm_ends_a_sweep_with_status_3_its_unfinished_trials_killed_and_no_report(tmp_path):
    # As timeout(1), systemd and Slurm stop a job: SIGTERM to the driver alone, after Ray put its own handlers in
    # place (it used to end in a C++ stack dump, exit 134, everything RUNNING). Ctrl-C to the whole process
    # group: the allocation test's other sweep.
    sweep_dir = tmp_path / "sweep"
    driver = start_sweep(["--study", "sunn-vs-gunn", *TINY, "optim.epochs=2", "--max-concurrent", "1",
                          "--dir", str(sweep_dir)], tmp_path)
    wait_for(driver, sweep_dir, "runs/*/checkpoint-e0001-*.pt")
    driver.send_signal(signal.SIGTERM)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 3, stdout[-3000:] + stderr[-3000:]
    assert f"To continue: python {REPO / 'pipelines' / 'sweep.py'} --resume {sweep_dir}" in stderr
    assert "Tuner.restore" not in stdout + stderr and not (sweep_dir / "report").exists()
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert parent.info.status == "KILLED"
    assert children and all(c.info.status in ("KILLED", "FINISHED") for c in children)
    assert any(c.info.status == "KILLED" for c in children) or len(children) < 2
    ray_folder = Path(tempfile.gettempdir()) / f"gunn-ray-{driver.pid}"
    assert not ray_folder.exists() and not ray_processes(ray_folder)

    # Started one trial at a time, resumed two at a time. A SIGTERM once both have finished, as the driver completes
    # their records, ends it as an interrupted sweep (or after it ends): never with status 143, Ray's default.
    late = start_sweep(["--resume", str(sweep_dir), "--max-concurrent", "2"], tmp_path)
    endings = sweep_dir / "tune-endings.json"
    while not (endings.is_file() and len(json.loads(endings.read_text())) == 2):
        assert late.poll() is None, late.communicate()
        time.sleep(0.1)
    time.sleep(1)
    late.send_signal(signal.SIGTERM)
    stdout, stderr = late.communicate(timeout=300)
    assert late.returncode == 0 or late.returncode == 3 and "to continue" in (stderr + stdout).lower(), stdout + stderr
    # Both trials were left (the first interrupted, the second not started): they start before either finishes.
    events = re.findall(r"^\[\d/2 done\] \S+: (started|finished)$", stdout, re.M)
    assert events[:2] == ["started", "started"], stdout
    resumed = run(SWEEP + ["--resume", str(sweep_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "warning" not in resumed.stderr and "Partial" not in resumed.stdout, resumed.stdout + resumed.stderr
    assert "Failed to fetch metrics" not in resumed.stdout + resumed.stderr  # Ray's restore noise
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert all([m.step for m in client(tmp_path).get_metric_history(c.info.run_id, "eval_top1_error")] == [1, 2]
               for c in children)


@pytest.mark.slow
def test_a_sweep_whose_driver_is_killed_resumes_without_redoing_finished_trials(tmp_path):
    sweep_dir = tmp_path / "sweep"
    driver = start_sweep(["--study", "sunn-vs-gunn", "--seeds", "0", "1", *TINY, "optim.epochs=2",
                          "--max-concurrent", "1", "--dir", str(sweep_dir)], tmp_path)
    # Killed as the first trial has written its final weights: before it ended its MLflow run.
    wait_for(driver, sweep_dir, "runs/*/model-final.pt")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.communicate()
    # The sweep's own Ray goes with it (a watchdog stops it): no process left, no folder.
    ray_folder = Path(tempfile.gettempdir()) / f"gunn-ray-{driver.pid}"
    deadline = time.monotonic() + 60
    while ray_folder.exists() or ray_processes(ray_folder):
        assert time.monotonic() < deadline, ray_processes(ray_folder)
        time.sleep(0.5)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("runs/*/model-final.pt")}
    assert 1 <= len(finished) < 4
    # Started one trial at a time, resumed two at a time.
    resumed = run(SWEEP + ["--resume", str(sweep_dir), "--max-concurrent", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "warning" not in resumed.stderr and "Partial" not in resumed.stdout, resumed.stdout + resumed.stderr
    events = re.findall(r"^\[\d/4 done\] \S+: (started|finished)$", resumed.stdout, re.M)
    if len(finished) <= 2:  # two trials or more left: the first two start before either finishes
        assert events[:2] == ["started", "started"], resumed.stdout
    for name, mtime in finished.items():  # finished trials were not trained again
        assert (sweep_dir / "runs" / name / "model-final.pt").stat().st_mtime_ns == mtime
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    mlflow = client(tmp_path)
    for child in children:  # every record complete: metrics once per epoch, and the final artifacts
        assert [m.step for m in mlflow.get_metric_history(child.info.run_id, "eval_top1_error")] == [1, 2]
        assert {a.path for a in mlflow.list_artifacts(child.info.run_id)} >= {"config.yaml", "curves.png",
                                                                              "model-final.pt"}
    assert parent.info.status == "FINISHED"
    with open(sweep_dir / "report" / "report.csv") as f:
        assert [row["finished"] for row in csv.DictReader(f)] == ["2", "2"]


@pytest.mark.slow
def test_asha_stops_poor_trials_as_a_normal_ending_and_the_report_compares_equal_epochs(tmp_path):
    # Trials in order, one at a time: the one that learns sets rung 1, the one with lr 0 falls below it.
    # A custom space is a grid of configuration values (here 2 x 1).
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: [0.1, 0.0]\nmodel.expansion: [2]\n")
    sweep_dir = tmp_path / "sweep"
    done = run(SWEEP + ["--study", "custom", "--space", "space.yaml", "optim.epochs=2", NO_MODEL,
                        "--max-concurrent", "1", "--asha", "--dir", str(sweep_dir)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[2/2 done] lr=0.0_expansion=2_seed=0: stopped early by ASHA after epoch 1" in done.stdout
    # Saved as an absolute path: --resume may run from another folder.
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["space"] == str(space)
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert sorted((c.data.params["model.expansion"], c.data.params["optim.lr"]) for c in children) == \
        [("2", "0.0"), ("2", "0.1")]
    mlflow = client(tmp_path)
    runs = {c.data.params["optim.lr"]: c for c in children}
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    stopped, full = runs["0.0"], runs["0.1"]
    assert (stopped.data.tags.get("stopped_early"), stopped.data.tags.get("stopped_epoch")) == ("true", "1")
    assert "stopped_early" not in full.data.tags
    assert [m.step for m in mlflow.get_metric_history(stopped.info.run_id, "eval_top1_error")] == [1]
    assert {a.path for a in mlflow.list_artifacts(full.info.run_id)} >= {"config.yaml", "curves.png", "model-final.pt"}
    with open(sweep_dir / "report" / "report.csv") as f:
        rows = {row["configuration"]: row for row in csv.DictReader(f)}
    assert (rows["lr=0.0"]["epoch"], rows["lr=0.0"]["stopped"]) == ("1", "1")
    assert (rows["lr=0.1"]["epoch"], rows["lr=0.1"]["stopped"]) == ("2", "0")
    assert "Full budget (2 epochs): best lr=0.1" in done.stdout


@pytest.mark.slow
def test_a_trial_that_fails_before_its_mlflow_run_exists_is_a_failed_child_and_a_report_row(tmp_path):
    # The CIFAR folder is there (what the check before Ray reads) but holds no data: the trial fails as its
    # engine loads it, before it has an MLflow run. The other trial, on synthetic data, finishes.
    (tmp_path / "broken" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "space.yaml").write_text("data.name: [synthetic, cifar10]\n")
    sweep_dir = tmp_path / "sweep"
    done = run(SWEEP + ["--study", "custom", "--space", "space.yaml", *TINY[1:], f"data.root={tmp_path / 'broken'}",
                        "optim.epochs=1", "--max-failures", "0", "--dir", str(sweep_dir)], tmp_path)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "Trial task failed" not in output  # Ray's 40 lines: in the run's files
    error = f"gunn.data.base.DataError: cifar10 in {tmp_path / 'broken'} is incomplete or corrupt"
    assert f"trial failed: name=cifar10_seed=0: {error}" in done.stderr
    parent, children = sweep_runs(tmp_path, sweep_dir)
    runs = {c.data.params["data.name"]: c for c in children}
    assert parent.info.status == "FAILED" and parent.data.tags["gunn.trials"] == "2"
    assert (runs["cifar10"].info.status, runs["synthetic"].info.status) == ("FAILED", "FINISHED")
    failed = runs["cifar10"]
    assert failed.data.tags["error"].startswith(error) and failed.info.run_name == "name=cifar10_seed=0"
    assert failed.data.params["model.depth"] == runs["synthetic"].data.params["model.depth"]  # resolved, as logged
    assert [a.path for a in client(tmp_path).list_artifacts(failed.info.run_id)] == ["trial-error.txt"]
    with open(sweep_dir / "report" / "report.csv") as f:
        rows = {row["configuration"]: row for row in csv.DictReader(f)}
    assert (rows["name=cifar10"]["failed"], rows["name=cifar10"]["finished"], rows["name=cifar10"]["epoch"]) == \
        ("1", "0", "nan")
    assert (rows["name=synthetic"]["failed"], rows["name=synthetic"]["finished"]) == ("0", "1")


@pytest.mark.slow
def test_a_sweep_runs_inside_one_allocation_of_the_local_slurm_cluster(slurm_cluster, tmp_path):
    # Another user's sweep runs locally on the same host meanwhile: the Slurm sweep must not touch its Ray.
    (tmp_path / "other").mkdir()
    other = start_sweep(["--study", "sunn-vs-gunn", "optim.epochs=20", "--max-concurrent", "1",
                         "--dir", str(tmp_path / "other" / "sweep")], tmp_path / "other", nice=True)
    other_ray = Path(tempfile.gettempdir()) / f"gunn-ray-{other.pid}"
    wait_for(other, tmp_path / "other" / "sweep", "runs/*/config.yaml")

    sweep_dir = tmp_path / "sweep"
    done = run(SWEEP + ["--study", "sunn-vs-gunn", *TINY, "optim.epochs=1", "--dir", str(sweep_dir),
                        "--cluster", "slurm", "--profile", "dev", "--cpus-per-task", "2", "--mem-gb", "4",
                        "--logs", str(tmp_path / "logs"), "--wait"], tmp_path)
    for _ in range(10):  # the other sweep and its Ray live on after this one stopped its own
        assert other.poll() is None and ray_processes(other_ray), other.communicate()[1][-3000:]
        time.sleep(0.5)
    os.killpg(other.pid, signal.SIGINT)
    assert other.wait(300) == 3, other.communicate()[1][-3000:]  # interrupted cleanly, not crashed
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = re.search(r"submitted job (\S+):", done.stdout).group(1)
    assert f"job {job}: sweep sweep finished, report in {sweep_dir / 'report'}\n" in done.stdout
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.data.tags.get("slurm_job_id") == job for c in children)
    assert (sweep_dir / "report" / "report.md").is_file()


def test_a_sweep_its_partition_can_never_run_is_refused_before_submission(slurm_cluster, tmp_path):
    nodes = len(slurm_cluster.nodes)
    done = run(SWEEP + ["--study", "sunn-vs-gunn", *TINY, "--dir", str(tmp_path / "sweep"), "--cluster", "slurm",
                        "--profile", "dev", "--nodes", str(nodes + 1), "--logs", str(tmp_path / "logs")], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: --nodes {nodes + 1} exceeds partition dev's {nodes} nodes" in done.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_sweep_over_two_nodes_places_trials_on_ray_workers_started_with_srun(slurm_cluster, tmp_path):
    if len(slurm_cluster.nodes) < 2:
        pytest.fail("this test needs the two-node development cluster: slurm/dev-cluster up --nodes 2")
    # One CPU per node and per trial: the two trials can only run at once, one on each node.
    sweep_dir = tmp_path / "sweep"
    done = run(SWEEP + ["--study", "sunn-vs-gunn", *TINY, "optim.epochs=1", "--dir", str(sweep_dir),
                        "--cluster", "slurm", "--profile", "dev", "--nodes", "2", "--cpus-per-task", "1",
                        "--mem-gb", "3", "--logs", str(tmp_path / "logs"), "--wait"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert sorted(c.data.tags["host"] for c in children) == slurm_cluster.nodes[:2]
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.slow
def test_a_preempted_sweep_requeues_its_allocation_and_finishes_every_trial(slurm_cluster, tmp_path):
    sweep_dir, logs = tmp_path / "sweep", tmp_path / "logs"
    done = run(SWEEP + ["--study", "sunn-vs-gunn", *TINY, "optim.epochs=2", "--max-concurrent", "1",
                        "--dir", str(sweep_dir), "--cluster", "slurm", "--profile", "dev", "--cpus-per-task", "2", "--mem-gb", "4",
                        "--logs", str(logs)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = re.search(r"submitted job (\S+):", done.stdout).group(1)
    deadline = time.monotonic() + 600
    while not list(sweep_dir.glob("runs/*/checkpoint-e0001-*.pt")):  # preempted in the first trial's epoch 2
        assert time.monotonic() < deadline, "the sweep did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what Slurm sends before preemption
    deadline = time.monotonic() + 900
    while job in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, "the requeued sweep did not end"
        time.sleep(2)
    out = (logs / job / f"{job}_0_log.out").read_text()
    assert f"requeueing job {job} (restart 1)" in out, out[-3000:]
    parent, children = sweep_runs(tmp_path, sweep_dir)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    mlflow = client(tmp_path)
    assert all([m.step for m in mlflow.get_metric_history(c.info.run_id, "eval_top1_error")] == [1, 2]
               for c in children)
    assert (sweep_dir / "report" / "report.md").is_file()
