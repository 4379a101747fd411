"""The report (gunn/sweeps/report.py, pipelines/report.py) on MLflow stores made by hand (no sweep, no Ray)."""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
from pathlib import Path

import pytest

from gunn.sweeps import records, report
from tests.pipelines.test_sweep import REPORT, run


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
    client.set_terminated(parent.info.run_id)  # the sweep has ended
    return uri, parent.info.run_id


@pytest.mark.slow
def test_the_report_shows_the_mode_the_trials_ran_in_when_the_space_did_not_set_one(tmp_path, capsys):
    uri, parent = hand_made_sweep(tmp_path)
    assert report.main([parent, "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "report.csv") as f:
        rows = {row["configuration"]: row["mode"] for row in csv.DictReader(f)}
    assert rows == {"expansion=1": "gunn", "expansion=2": "gunn"}  # gunn_tiny's own mode


@pytest.mark.slow
def test_the_report_of_an_unknown_run_or_sweep_is_one_error_line(tmp_path, capsys):
    uri, _ = hand_made_sweep(tmp_path)
    for sweep, message in (("0" * 32, f"error: no run {'0' * 32} at {uri}"),
                           ("nosuch", f"error: no sweep named 'nosuch' at {uri}")):
        status = report.main([sweep, "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert status == 2 and err.strip() == message, err


@pytest.mark.slow
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


def test_the_report_against_a_server_that_does_not_answer_says_so_in_one_line_at_once(capsys):
    import time

    from tests.mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: MLflow's client would retry for minutes
    started = time.monotonic()
    assert report.main(["some-sweep", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLflow at {uri} does not answer (") and err.count("\n") == 1
    assert "start it, or pass the sweep's store with --tracking-uri" in err
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_the_sweeps_rebuild_command_runs_from_another_folder(tmp_path):
    uri, parent = hand_made_sweep(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = shlex.split(records.rebuild_command(parent, uri))
    assert command[0] == "python" and Path(command[1]).is_absolute()
    done = run([sys.executable, *command[1:]], elsewhere, timeout=120)
    assert done.returncode == 0 and "(custom), 2 trials" in done.stdout, done.stderr[-2000:]


def sweep_of(folder: Path, trials: list[dict]) -> tuple[str, str]:
    """A sweep's parent run and a FINISHED child run of gunn_tiny on digits per trial (``expansion``, ``seed``,
    ``metrics``: values by name for epochs 1, 2, ..., ``tags``), its artifacts under ``folder``; the store's URI
    and the parent's id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    (folder / "store").mkdir()
    uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps", artifact_location=(folder / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="asha-digits", tags={"study": "custom", "sweep": "asha-digits"})
    for trial in trials:
        child = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id, "study": "custom",
                                                    **trial.get("tags", {})})
        for key, value in {"model.name": "gunn_tiny", "model.expansion": str(trial["expansion"]),
                           "data.name": "digits", "runtime.seed": str(trial["seed"])}.items():
            client.log_param(child.info.run_id, key, value)
        client.log_batch(child.info.run_id, metrics=[Metric(name, value, 1000 * epoch, epoch)
                                                     for name, values in trial["metrics"].items()
                                                     for epoch, value in enumerate(values, 1)])
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)  # the sweep has ended
    return uri, parent.info.run_id


STOPPED = {"stopped_early": "true", "stopped_epoch": "2"}


@pytest.mark.slow
def test_trials_stopped_early_are_compared_at_the_last_epoch_every_seed_reached(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, parent = sweep_of(tmp_path, [
        {"expansion": 1, "seed": 0, "metrics": {"eval_top1_error": [50, 40, 30], "train_top1_error": [55, 45, 35],
                                                "diag/l1/collapsed_pairs": [1, 2, 3]}},
        {"expansion": 1, "seed": 1, "metrics": {"eval_top1_error": [52, 44], "train_top1_error": [57, 47],
                                                "diag/l1/collapsed_pairs": [1, 4]}, "tags": STOPPED},
        {"expansion": 2, "seed": 0, "metrics": {"eval_top1_error": [45, 35, 25]}},
        {"expansion": 2, "seed": 1, "metrics": {"eval_top1_error": [47, 37, 27]}}])
    text = report.build(uri, parent, tmp_path / "out")
    with open(tmp_path / "out" / "report.csv") as f:
        rows = {row["configuration"]: row for row in csv.DictReader(f)}
    one, two = rows["expansion=1"], rows["expansion=2"]
    assert (one["finished"], one["stopped"], one["epoch"], two["stopped"], two["epoch"]) == ("1", "1", "2", "0", "3")
    assert float(one["top1_error_mean"]) == 42.0 and abs(float(one["top1_error_std"]) - 8 ** 0.5) < 1e-9
    assert float(two["top1_error_mean"]) == 26.0 and float(one["collapsed_pairs"]) == 3.0  # at epoch 2 too
    best = "Full budget (3 epochs): best expansion=2: top-1 error 26.00 ± 1.41 % (2 seeds)"
    md = (tmp_path / "out" / "report.md").read_text()
    assert best in md and text.endswith(best) and "| stopped |" in md and "| at epoch |" in md
    assert "final epoch" not in md and "last epoch that every seed of the configuration reached" in md
    _, children = report.collect(uri, parent)
    curves = report.summarize(MlflowClient(uri), children).curves["expansion=1"]
    assert curves == {"eval_top1_error": ([1, 2], [51, 42]), "train_top1_error": ([1, 2], [56, 46])}


@pytest.mark.slow
def test_the_report_says_when_no_configuration_ran_the_full_budget(tmp_path):
    uri, parent = sweep_of(tmp_path, [
        {"expansion": 1, "seed": 0, "metrics": {"eval_top1_error": [50, 40, 30]}},
        {"expansion": 1, "seed": 1, "metrics": {"eval_top1_error": [52, 44]}, "tags": STOPPED},
        {"expansion": 2, "seed": 0, "metrics": {"eval_top1_error": [45, 35]}, "tags": STOPPED}])
    text = report.build(uri, parent, tmp_path / "out")
    line = ("Full budget (3 epochs): no configuration ran the full budget in all its trials; of the trials that "
            "did, best expansion=1: top-1 error 30.00 % (1 of 2 seeds)")  # no spread from one seed
    assert text.endswith(line) and line in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_the_report_shows_throughput_per_configuration_with_its_spread_over_trials(tmp_path):
    uri, parent = sweep_of(tmp_path, [
        {"expansion": 1, "seed": 0, "metrics": {"eval_top1_error": [50, 40], "images_per_s": [100, 200],
                                                "epoch_time": [2, 4]}},
        {"expansion": 1, "seed": 1, "metrics": {"eval_top1_error": [50, 40], "images_per_s": [300, 300],
                                                "epoch_time": [3, 3]}},
        {"expansion": 2, "seed": 0, "metrics": {"eval_top1_error": [50, 40], "images_per_s": [400, 400]}}])
    text = report.build(uri, parent, tmp_path / "out")
    with open(tmp_path / "out" / "report.csv") as f:
        reader = csv.DictReader(f)
        rows = {row["configuration"]: row for row in reader}
    assert reader.fieldnames == [key for key, _ in report.COLUMNS]
    one, two = rows["expansion=1"], rows["expansion=2"]
    assert float(one["images_per_s"]) == 225.0 and abs(float(one["images_per_s_std"]) - 75 * 2 ** 0.5) < 1e-9
    assert float(two["images_per_s"]) == 400.0 and math.isnan(float(two["images_per_s_std"]))  # one trial: no spread
    assert float(one["epoch_time_s"]) == 3.0
    assert "| s/epoch | images/s | +- |" in text and "| 3.00 | 225.00 | 106.07 |" in text


@pytest.mark.slow
def test_the_peak_memory_header_and_text_say_what_was_measured(tmp_path):
    for device, title in (("cpu", "peak MB (process RSS)"), ("cuda", "peak MB (CUDA allocated)"), (None, "peak MB")):
        folder = tmp_path / str(device)
        folder.mkdir()
        tags = {"device": device} if device else {}
        uri, parent = sweep_of(folder, [{"expansion": e, "seed": 0, "tags": tags,
                                         "metrics": {"eval_top1_error": [40], "peak_memory_mb": [700 + e]}}
                                        for e in (1, 2)])
        text = report.build(uri, parent, folder / "out")
        md = (folder / "out" / "report.md").read_text()
        assert f"| +- | {title} | collapsed pairs |" in text and f"| {title} |" in md
        assert "ru_maxrss" in md and "torch.cuda.max_memory_allocated" in md
        assert (f"these trials ran on {device}" if device else "did not say on which device") in md


def test_the_cost_of_a_model_is_measured_on_the_input_its_data_gives_and_follows_depth():
    from gunn.models import default_cfg

    assert report.input_shape({"model.name": "gunn18", "data.name": "imagenet"}) == (3, 224, 1000)
    assert report.input_shape({"model.name": "gunn_tiny", "data.name": "digits"}) == (1, 32, 10)
    assert report.input_shape({"model.name": "gunn15", "data.name": "cifar100"}) == (3, 32, 100)
    assert report.input_shape({"model.name": "gunn15", "data.name": "synthetic", "data.image_size": "16",
                               "data.classes": "5"}) == (3, 16, 5)
    params, _, widths, mode = report.model_cost({"model.name": "gunn_tiny", "data.name": "digits", "model.depth": "2"})
    deeper = params
    params, _, widths, mode = report.model_cost({"model.name": "gunn_tiny", "data.name": "digits"})
    assert deeper > params and widths == [w // s for w, s in zip(default_cfg("gunn_tiny").widths,
                                                                   default_cfg("gunn_tiny").segments)]
    assert mode == "gunn"


@pytest.mark.slow
def test_the_report_of_an_unfinished_sweep_says_it_is_partial_and_is_not_attached_unless_asked(tmp_path, capsys):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps", artifact_location=(tmp_path / "artifacts").as_uri())
    names = ["expansion=1_seed=0", "expansion=2_seed=0", "expansion=1_seed=1"]
    parent = client.create_run(experiment, run_name="cut-short", tags={
        "study": "custom", "sweep": "cut-short", "gunn.trials": "3", "gunn.trial_names": json.dumps(names)})
    # Interrupted: one trial finished its 3 epochs, one was killed after 2, the third never started.
    for name, errors, status in ((names[0], [50, 40, 30], "FINISHED"), (names[1], [45, 35], "KILLED")):
        child = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id})
        for key, value in {"model.name": "gunn_tiny", "model.expansion": name[10], "data.name": "digits",
                           "runtime.seed": "0", "optim.epochs": "3"}.items():
            client.log_param(child.info.run_id, key, value)
        client.log_batch(child.info.run_id, metrics=[Metric("eval_top1_error", e, 1000 * k, k) for k, e in
                                                     enumerate(errors, 1)])
        client.set_terminated(child.info.run_id, status)
    client.set_terminated(parent.info.run_id, "KILLED")
    assert report.main([parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    partial = ("Partial: the sweep's parent run is KILLED; 1 of 3 trials have ended; not ended: expansion=2_seed=0 "
               "(KILLED); no run yet: expansion=1_seed=1. The figures cover what has been logged so far.")
    assert partial in text and partial in (tmp_path / "out" / "report.md").read_text()
    # The budget is the 3 epochs the trials were given, not the 2 that the killed one reached.
    assert "So far: Full budget (3 epochs): best expansion=1: top-1 error 30.00 % (1 seed)" in text
    assert f"Not logged to the parent run {parent.info.run_id}: it is KILLED" in text
    assert client.list_artifacts(parent.info.run_id) == []
    assert report.main([parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--attach"]) == 0
    assert "Not logged" not in capsys.readouterr().out
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["report"]


@pytest.mark.slow
def test_the_report_puts_the_papers_error_beside_a_run_of_its_recipe_and_logs_summary_metrics_to_the_parent(tmp_path):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from gunn import config as cfgmod
    from gunn.models import paper

    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="paper-cifar-x", tags={"study": "paper-cifar", "sweep": "x"})
    recipe = {k: v for k, v in cfgmod.flatten(cfgmod.load("gunn15-cifar10", [])).items() if k.startswith("optim.")}
    for model, epochs, errors in (("gunn15", 300, (4.0, 5.0)), ("sunn15", 1, (6.0, 6.0))):
        for seed, error in enumerate(errors):
            child = client.create_run(experiment, run_name=f"model={model}_seed={seed}",
                                      tags={"mlflow.parentRunId": parent.info.run_id, "study": "paper-cifar"})
            params = {**{k: str(v) for k, v in recipe.items()}, "optim.epochs": str(epochs), "model.name": model,
                      "data.name": "cifar10", "runtime.seed": str(seed)}
            client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in params.items()],
                             metrics=[Metric("eval_top1_error", error, 1000, epochs), Metric("eval_top5_error", 1.0, 1000, epochs),
                                      Metric("images_per_s", 100.0 * (seed + 1), 1000, epochs)])
            client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)

    report.build(uri, parent.info.run_id, tmp_path / "out")
    with open(tmp_path / "out" / "report.csv") as f:
        rows = {row["configuration"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"model=gunn15", "model=sunn15"}
    assert float(rows["model=gunn15"]["paper_top1_error"]) == paper.published("gunn15", "cifar10").top1 == 4.15
    assert float(rows["model=gunn15"]["top1_error_mean"]) == 4.5 and float(rows["model=gunn15"]["top5_error_mean"]) == 1.0
    assert math.isnan(float(rows["model=sunn15"]["paper_top1_error"]))  # one epoch is not the paper's recipe
    assert int(rows["model=gunn15"]["parameters"]) == 1_585_746
    local = (tmp_path / "out" / "report.md").read_text()
    assert "sunn15 on cifar10 (Table 5: 5.64%) is not shown: its trials differ in optim.epochs=1 (paper: 300)" in local
    assert "![curves](curves.png)" in local  # beside the file
    # The parent run: its summary per configuration as metrics, and a report.md whose images MLflow's preview shows.
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["eval_top1_error_mean/gunn15"] == 4.5 and metrics["eval_top1_error_std/gunn15"] == math.sqrt(0.5)
    assert metrics["eval_top1_error_mean/sunn15"] == 6.0 and metrics["images_per_s/sunn15"] == 150.0
    assert metrics["parameters/gunn15"] == 1_585_746 and abs(metrics["gmac_per_image/gunn15"] - 0.5557) < 1e-3
    served = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path / "dl"))).read_text()
    link = f"{report.MLFLOW_UI}/get-artifact?path=report%2Fcurves.png&run_uuid={parent.info.run_id}"  # `mlflow ui`'s
    assert f"![curves]({link})" in served and served.replace(link, "curves.png") == local
