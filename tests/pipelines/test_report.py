"""pipelines/report.py on MLflow stores made by hand (no sweep, no Ray)."""

from __future__ import annotations

import csv
import importlib.util
import shlex
import sys
from pathlib import Path

from tests.pipelines.test_sweep import REPO, REPORT, run


def hand_made_sweep(folder: Path) -> tuple[str, str]:
    """A sweep's parent run and two child runs that vary model.expansion and do not set model.mode; the store's
    URI and the parent's id."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
    (folder / "store").mkdir()
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps")
    parent = client.create_run(experiment, run_name="custom-digits", tags={"study": "custom", "sweep": "custom-digits"})
    for expansion, error in ((1, 30.0), (2, 20.0)):
        child = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id, "study": "custom"})
        for key, value in {"model.name": "gunn_tiny", "model.mode": "None", "model.expansion": str(expansion),
                           "data.name": "digits", "runtime.seed": "0"}.items():
            client.log_param(child.info.run_id, key, value)
        client.log_metric(child.info.run_id, "eval_top1_error", error, step=1)
        client.set_terminated(child.info.run_id)
    return uri, parent.info.run_id


def test_the_report_shows_the_mode_the_trials_ran_in_when_the_space_did_not_set_one(tmp_path):
    uri, parent = hand_made_sweep(tmp_path)
    done = run(REPORT + [parent, "--tracking-uri", uri, "--out", str(tmp_path / "out")], tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "out" / "report.csv") as f:
        rows = {row["configuration"]: row["mode"] for row in csv.DictReader(f)}
    assert rows == {"expansion=1": "gunn", "expansion=2": "gunn"}  # gunn_tiny's own mode


def test_the_report_of_an_unknown_run_or_sweep_is_one_error_line(tmp_path):
    uri, _ = hand_made_sweep(tmp_path)
    for sweep, message in (("0" * 32, f"error: no run {'0' * 32} at {uri}"),
                           ("nosuch", f"error: no sweep named 'nosuch' at {uri}")):
        done = run(REPORT + [sweep, "--tracking-uri", uri], tmp_path, timeout=120)
        assert done.returncode == 2 and done.stderr.strip() == message, done.stderr


def test_the_report_never_creates_a_store_and_says_where_it_looked(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "empty.db").touch()
    for args, path in (([], elsewhere / "mlflow.db"),  # the default store of this folder
                       (["--tracking-uri", f"sqlite:///{elsewhere / 'empty.db'}"], elsewhere / "empty.db"),
                       (["--tracking-uri", (elsewhere / "mlruns").as_uri()], elsewhere / "mlruns")):
        done = run(REPORT + ["some-sweep", *args], elsewhere, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("error: no MLflow store at ") and f"({path} is missing" in done.stderr
        assert sorted(p.name for p in elsewhere.iterdir()) == ["empty.db"] and not (elsewhere / "empty.db").stat().st_size


def test_the_sweeps_rebuild_command_runs_from_another_folder(tmp_path):
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("sweep_under_test", REPO / "pipelines" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(sweep)  # puts pipelines/ and jobs/ on sys.path
    finally:
        sys.path[:] = path
    uri, parent = hand_made_sweep(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = shlex.split(sweep.rebuild_command(parent, uri))
    assert command[0] == "python" and Path(command[1]).is_absolute()
    done = run([sys.executable, *command[1:]], elsewhere, timeout=120)
    assert done.returncode == 0 and "(custom), 2 trials" in done.stdout, done.stderr[-2000:]
