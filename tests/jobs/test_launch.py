"""The launcher (gunn/cluster/; jobs/launch.py) as users run it: defaults, checks before work, signals, local
processes, cluster profiles."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gunn import config as cfgmod
from gunn.cluster import commands, options, slurm
from gunn.cluster.options import cluster_options
from gunn.cluster import launch as launcher

REPO = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, str(REPO / "jobs" / "launch.py")]
# Tiny data, and no MLflow model export at the end (seconds a run; tests/train/test_mlflow_model.py checks it).
QUICK = ["data.name=synthetic", "data.samples=256", "data.image_size=16", "data.classes=4", "optim.batch_size=16",
         "logging.progress=false", "logging.model=false"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that crashes shows where
    return env


def launch(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCH + args, check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
                          **kwargs)


def launch_until_checkpoint(args: list[str], cwd: Path, run_dir: Path, **kwargs) -> subprocess.Popen:
    """Starts the launcher and returns once the run has written its first checkpoint."""
    process = subprocess.Popen(LAUNCH + args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kwargs)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint-*.pt")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    return process


@pytest.mark.slow
@pytest.mark.parametrize("after_s", [0.3, 1.5, 3.0])
def test_ctrl_c_while_the_launcher_starts_ends_it_quietly(tmp_path, after_s):
    # While Python loads torch and the launcher checks its arguments there is nothing to save: status 130, one
    # line at most, never a KeyboardInterrupt traceback. Later, the run checkpoints (status 3).
    # SIGINT at its default action in the launcher, as in a terminal (a test run started in the background by a
    # shell inherits it ignored).
    process = subprocess.Popen(LAUNCH + QUICK + ["logging.mlflow=false", "checkpoint.dir=run"], cwd=tmp_path, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode in (130, 3), out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip() in ("", "python jobs/launch.py: interrupted (Ctrl-C)") or process.returncode == 3, err


@pytest.mark.slow
def test_no_arguments_trains_the_digits_demo_to_95_percent_and_logs_it_locally(tmp_path):
    from mlflow.tracking import MlflowClient

    done = launch([], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # A clean first run: no warning, and not MLflow's INFO lines about the new store's tables.
    assert "warning" not in done.stderr.lower() and " INFO " not in done.stderr, done.stderr[-3000:]
    error = float(re.search(r"finished: eval top-1 error ([\d.]+)%", done.stdout).group(1))
    assert error <= 5.0, done.stdout
    run_dir = Path(re.search(r"finished: 6/6 epochs in (\S+)", done.stdout).group(1))
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "model-final.pt").is_file()
    run_id = re.search(r"MLflow run (\w+) at (\S+)", done.stdout).group(1)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert float(run.data.metrics["eval_top1_error"]) == pytest.approx(error, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.lr=-1"], "error: optim.lr must be >= 0.0, got -1.0"),
        (["gunn15-cifar10", "data.root=nowhere"], "error: cifar10 not found: expected nowhere/cifar-10-batches-py/"),
        (["no-such-preset"], "error: no preset or configuration file 'no-such-preset'"),
        (["model.segments=[5, 5, 5]"], "error: model: segments[0] must be a positive divisor"),
        (["runtime.device=cuda"], "error: runtime.device='cuda' but CUDA is not usable: "),
        (["logging.tracking_uri=htp://x"], "error: logging.tracking_uri=htp://x: its scheme 'htp' is none that MLflow "
                                           "stores use (file, sqlite, http, https"),
    ],
)
def test_bad_input_is_reported_with_its_field_before_any_work(tmp_path, args, message):
    done = launch(args, tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_fields_and_the_resolved_configuration_can_be_printed(tmp_path):
    fields = launch(["--fields"], tmp_path)
    assert fields.returncode == 0 and "optim.batch_size" in fields.stdout
    printed = launch(["optim.epochs=3", "--print-config"], tmp_path)
    assert printed.returncode == 0 and "epochs: 3" in printed.stdout and f"dir: {tmp_path}/runs/digits-" in printed.stdout


@pytest.mark.slow
def test_printing_a_configuration_needs_no_data_but_training_does(tmp_path):
    # The README's own example, on a machine without CIFAR.
    printed = launch(["gunn24-cifar10", "--print-config"], tmp_path)
    assert printed.returncode == 0, printed.stderr
    config = yaml.safe_load(printed.stdout)
    assert (config["name"], config["model"]["name"], config["data"]["name"]) == ("gunn24-cifar10", "gunn24", "cifar10")
    assert "cifar10 not found" in printed.stderr and "Traceback" not in printed.stderr  # said, as a note
    trained = launch(["gunn24-cifar10", "optim.epochs=1"], tmp_path)
    assert trained.returncode == 2
    assert "error: cifar10 not found: expected data/cifar-10-batches-py/" in trained.stderr
    assert "python -m gunn.data download cifar10 --root data" in trained.stderr and "Traceback" not in trained.stderr
    assert not (tmp_path / "runs").exists()


def test_the_printed_configuration_holds_the_model_values_the_run_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert launcher.main(["--print-config"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model == {"name": "gunn_tiny", "mode": "gunn", "residual": True, "segments": [4, 4, 4], "expansion": 2, "depth": 1,
                     "memory": "efficient"}
    assert launcher.main(["sunn15-cifar10", "model.segments=[10, 10, 10]", "model.residual=false", "data.root=.",
                          "--print-config"]) == 0
    out = capsys.readouterr()
    model = yaml.safe_load(out.out)["model"]
    assert (model["mode"], model["segments"], model["residual"], model["expansion"]) == ("sunn", [10, 10, 10], False, 2)
    assert "cifar10 not found" in out.err


def test_every_option_of_the_help_says_what_it_does():
    parser = launcher.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings or action.dest} has no description"
    text = parser.format_help()
    for option, words in [("--time-min", "time limit"), ("--partition", "partition"), ("--gpus-per-node", "GPUs"),
                          ("--max-requeues", "requeues"), ("--signal-delay-s", "SIGUSR2"), ("--mem-gb", "memory")]:
        assert re.search(rf"{option} \S+\s+[^\n]*{words}", text), (option, text)


@pytest.mark.slow
def test_a_slurm_job_given_gpus_must_train_on_them_and_the_login_node_does_not_check_them(tmp_path):
    printed = launch(["--cluster", "slurm", "--gpus-per-node", "1", "--print-config"], tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "device: cuda" in printed.stdout  # in the job, a GPU that CUDA cannot use stops it with the reason
    local = launch(["--cluster", "slurm", "--print-config"], tmp_path)
    assert "device: auto" in local.stdout


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_second_launch_finishes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = QUICK + ["optim.epochs=40", "logging.mlflow=false", f"checkpoint.dir={run_dir}"]
    process = launch_until_checkpoint(args, tmp_path, run_dir)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, err[-2000:]
    assert "checkpointed at epoch" in out
    resumed = launch(args[:-3] + ["optim.epochs=3", "logging.mlflow=false", f"checkpoint.dir={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "finished: 3/3 epochs" in resumed.stdout


@pytest.mark.slow
def test_nproc_runs_data_parallel_processes_on_this_machine(tmp_path):
    done = launch(QUICK + ["optim.epochs=1", "logging.mlflow=false", f"checkpoint.dir={tmp_path / 'run'}",
                           "--nproc", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"finished: 1/1 epochs in {tmp_path / 'run'} (2 processes)" in done.stdout
    # Two ranks on this machine share its CPUs instead of each taking all of them.
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"2 ranks in a gloo process group, {threads} CPU thread(s) each" in done.stdout
    assert (tmp_path / "run" / "model-final.pt").is_file()


@pytest.mark.slow
def test_nproc_1_with_a_backend_named_trains_one_rank_in_a_process_group_and_resumes(tmp_path):
    # How NCCL's start-up, its object collectives and the stop poll over it run on a single GPU.
    run_dir = tmp_path / "run"
    args = QUICK + ["logging.mlflow=false", "dist.backend=gloo", f"checkpoint.dir={run_dir}", "--nproc", "1"]
    first = launch(args + ["optim.epochs=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 rank in a gloo process group" in first.stdout and "finished: 1/1 epochs" in first.stdout
    resumed = launch(args + ["optim.epochs=2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 rank in a gloo process group" in resumed.stdout and "resuming" in resumed.stdout
    assert "finished: 2/2 epochs" in resumed.stdout


def _spawned_ranks(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]


def two_ranks_training(tmp_path: Path, epochs: int) -> tuple[list[str], Path, subprocess.Popen, list[int]]:
    """``--nproc 2`` started and past its first checkpoint: its arguments, run directory, process and ranks."""
    run_dir = tmp_path / "run"
    args = QUICK + [f"optim.epochs={epochs}", "logging.mlflow=false", f"checkpoint.dir={run_dir}", "--nproc", "2"]
    process = launch_until_checkpoint(args, tmp_path, run_dir)
    ranks = _spawned_ranks(process.pid)
    assert len(ranks) == 2, ranks
    return args, run_dir, process, ranks


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_with_a_clear_error_and_the_run_continues_from_its_checkpoint(tmp_path):
    args, run_dir, process, ranks = two_ranks_training(tmp_path, epochs=6)
    os.kill(ranks[1], signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err[-2000:]
    assert re.search(r"error: rank [01] of 2 failed: process [01] terminated with signal SIGKILL", err), err[-2000:]
    assert f"Run the same command again to continue {run_dir}" in err and "Traceback" not in err
    resumed = launch(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr + resumed.stdout and (run_dir / "model-final.pt").is_file()


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint-*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the launcher", "Ctrl-C to the process group"])
def test_a_stop_signal_checkpoints_every_rank_of_nproc_2_and_the_same_command_finishes_the_run(tmp_path, how):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = QUICK + ["optim.epochs=4", f"checkpoint.dir={run_dir}", "--nproc", "2"]
    # Ctrl-C in a terminal: SIGINT to the launcher and both ranks at once (their process group).
    process = launch_until_checkpoint(args, tmp_path, run_dir, start_new_session=True)
    signalled = time.time()
    if how.startswith("SIGTERM"):
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "checkpointed at epoch" in out
    assert re.search(r"interrupted: [1-3]/4 epochs in \S+ \(2 processes\)", out), out
    # Taken when the signal came (at the same position as the epoch's when it came before the next batch).
    assert (run_dir / _checkpoints(run_dir)[-1]).stat().st_mtime >= signalled
    run_id = re.search(r"MLflow run (\w+) at (\S+)", out).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"
    resumed = launch(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "finished: 4/4 epochs" in resumed.stdout and (run_dir / "model-final.pt").is_file()
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_second_signal_aborts_nproc_2_at_once(tmp_path):
    run_dir = tmp_path / "run"
    args = QUICK + ["optim.epochs=40", "logging.mlflow=false", f"checkpoint.dir={run_dir}", "--nproc", "2"]
    process = launch_until_checkpoint(args, tmp_path, run_dir)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    assert "error: aborted by a second SIGTERM: the ranks were killed" in err and "Traceback" not in err
    # Nothing else: neither torch's "Terminating process" nor the resource tracker's leaked semaphores.
    assert "leaked semaphore" not in err and "Terminating process" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--time-min", "1"], ("error: --signal-delay-s 120 is not shorter than the time limit, --time-min 1 (60 s): "
                               "every start of the job would be told at once to checkpoint and requeue. Give a smaller "
                               "--signal-delay-s or a longer --time-min")),
        (["--time-min", "2", "--signal-delay-s", "120"], ("error: --signal-delay-s 120 is not shorter than the time "
                                                          "limit, --time-min 2 (120 s)")),
        (["--signal-delay-s", "0"], "error: --signal-delay-s must be at least 1, got 0"),
        (["--time-min", "2", "--signal-delay-s", "90"], ("error: --time-min 2 with --signal-delay-s 90 leaves 30 s of "
                                                         "work per start of the job, less than the 120 s that a start "
                                                         "(Python, the data, the model, the process group) and one "
                                                         "checkpoint take: it would requeue again and again with little "
                                                         "or no progress. Give --time-min 4 or more")),
        (["--max-requeues", "-1"], "error: --max-requeues must be at least 0, got -1"),
    ],
)
def test_cluster_options_that_cannot_work_are_refused_before_submission(tmp_path, args, message):
    done = launch(QUICK + ["--cluster", "slurm", "--logs", str(tmp_path / "logs")] + args, tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "logs").exists()


def test_a_failed_requeue_says_why_and_how_to_continue_the_run(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    command = "python jobs/launch.py checkpoint.dir=/runs/r --cluster slurm"
    problem = slurm.requeue_job("999999999", 3, "/runs/r", command)
    err = capsys.readouterr().err
    assert problem is not None and problem.startswith("scontrol requeue 999999999 failed: ")
    assert f"error: {problem}; to continue the run: {command}" in err
    if shutil.which("scontrol") and Path("/etc/slurm/slurm.conf").exists():  # scontrol's own words
        assert "Invalid job id specified" in problem, problem
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert slurm.requeue_job("999999999", 3, "/runs/r", command) == \
        "stopped at its requeue limit (3 requeues, max_requeues 3)"
    assert f"not requeued: the job stopped at its requeue limit (3 requeues, max_requeues 3); to continue the run: " \
        f"{command}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_whose_store_never_answered_ends_saying_how_many_records_wait_and_how_to_send_them(tmp_path):
    from tests.mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = launch(QUICK + ["optim.epochs=1", f"logging.tracking_uri={uri}", f"checkpoint.dir={tmp_path / 'r'}"],
                  tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"MLflow: {uri} never created the run; its \d+ record\(s\) wait in {tmp_path / 'r'}/"
                        rf"mlflow-journal.jsonl: send them with python -m gunn.train.tracking sync {tmp_path / 'r'} "
                        r"\(add --tracking-uri URI if the store moved\)", last), last
    # A server's runs are browsed at its own address; a local store's with mlflow ui.
    assert slurm.mlflow_line("abc", "http://host:5000") == \
        "MLflow run abc at http://host:5000  (browse: open http://host:5000/#/runs/abc)"
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in slurm.mlflow_line("abc", "sqlite:////x/mlflow.db")


@pytest.mark.slow
def test_fields_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    listing = subprocess.Popen(LAUNCH + ["--fields"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    listing.stdout.close()  # as `| head` does once it has its lines: the listing writes into a closed pipe
    err = listing.stderr.read()
    assert listing.wait(timeout=60) == 0 and "BrokenPipeError" not in err and "Traceback" not in err, err


def test_an_entry_point_names_itself_in_its_help_and_messages_also_beside_a_checkout(monkeypatch):
    from gunn.cluster import commands

    monkeypatch.setattr(sys, "argv", ["/venv/bin/gunn-launch", "--help"])  # an editable install's entry point
    assert commands.program("launch") == "gunn-launch" and commands.command("launch") == ["gunn-launch"]
    monkeypatch.setattr(sys, "argv", ["jobs/launch.py"])
    assert commands.program("launch") == "python jobs/launch.py"


def test_a_seed_given_twice_is_refused_as_the_sweeps_refuse_it(capsys):
    with pytest.raises(SystemExit) as exited:
        launcher.parse_args(["--seeds", "1", "1", "2"])
    assert exited.value.code == 2 and "error: --seeds: 1 given twice" in capsys.readouterr().err


def test_the_command_that_continues_a_slurm_run_names_its_directory_and_its_options(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = launcher.parse_args(["gunn15-cifar10", "optim.lr=0.05", "--seeds", "3", "4", "--cluster", "slurm",
                                "--profile", "dev", "--time-min", "30", "--sbatch", "exclusive=true", "--wait"])
    config = cfgmod.load("gunn15-cifar10", ["optim.lr=0.05", "name=gunn15-cifar10-seed4",
                                                     f"checkpoint.dir={tmp_path}/r"])
    assert launcher.continue_command(args, "gunn15-cifar10", 4, config) == (
        f"python jobs/launch.py gunn15-cifar10 optim.lr=0.05 runtime.seed=4 name=gunn15-cifar10-seed4 "
        f"checkpoint.dir={tmp_path}/r --cluster slurm --profile dev --time-min 30 --sbatch exclusive=true")


@pytest.mark.parametrize(
    "reason,never",
    [("PartitionNodeLimit", True), ("PartitionConfig", True), ("PartitionTimeLimit", True), ("BadConstraints", True),
     ("InvalidAccount", True), ("DependencyNeverSatisfied", True), ("QOSMaxWallDurationPerJobLimit", True),
     ("Resources", False), ("Priority", False), ("JobHeldUser", False), ("BeginTime", False), ("Dependency", False),
     ("ReqNodeNotAvail", False), ("QOSMaxJobsPerUserLimit", False), ("AssocGrpCpuLimit", False), ("None", False)],
)
def test_only_pending_reasons_that_never_clear_stop_wait(reason, never):
    assert (slurm.never_starts(reason) is not None) == never


@pytest.mark.parametrize("text,minutes", [("UNLIMITED", None), ("INFINITE", None), ("30", 30), ("30:30", 30.5),
                                          ("02:00:00", 120), ("1-00:00:00", 1440), ("2-12", 3600), ("1-01:30", 1530)])
def test_slurm_times_are_read_in_minutes(text, minutes):
    assert slurm._minutes(text) == minutes


def test_sbatch_options_of_the_profile_and_the_command_line_are_merged(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("partition: gpu\nsbatch: {exclusive: true, mail-type: END}\nsetup: [module load cuda]\n")
    args = launcher.parse_args(["--cluster", "slurm", "--profile", str(profile), "--sbatch", "mail-type=FAIL",
                                "--sbatch", "comment=x=y", "--partition", "dev"])
    options = cluster_options(args)
    assert options["sbatch"] == {"exclusive": True, "mail-type": "FAIL", "comment": "x=y"}
    assert options["setup"] == ["module load cuda"] and options["partition"] == "dev"


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_clear_line_and_the_previous_checkpoint_intact(tmp_path):
    from tests.train.full_disk import small_tmpfs

    # Room for one checkpoint of this run (about 1 MB), not two.
    with small_tmpfs(tmp_path / "disk", size="1600k") as disk:
        done = launch(QUICK + ["optim.epochs=3", "logging.mlflow=false", f"checkpoint.dir={disk / 'run'}"], tmp_path)
        assert done.returncode == 1, done.stdout + done.stderr
        assert (f"error: no space left on device while writing checkpoint {disk / 'run' / 'checkpoint-e0002-b000000.pt'}"
                f"; the previous checkpoint {disk / 'run' / 'checkpoint-e0001-b000000.pt'} is intact") in done.stderr
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in (disk / "run").iterdir() if "tmp" in p.name) == []


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_loss_that_becomes_nan_ends_the_run_with_exit_1_naming_epoch_and_batch(tmp_path, nproc):
    # With the progress bar on, into a log file: the error is a line of its own there (split at newlines only).
    args = ["optim.epochs=2", "optim.lr=1e8", "logging.mlflow=false", f"checkpoint.dir={tmp_path / 'r'}",
            "--nproc", str(nproc), "logging.progress=true"]
    done = launch(QUICK + args, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    where = r"in batch \d+" if nproc == 1 else r"by batch \d+ on rank [01] of 2"
    assert "\r" not in done.stderr  # the bar's redraws are lines of their own in a file
    errors = [line for line in done.stderr.split("\n") if line.startswith("error:")]
    assert len(errors) == 1 and re.match(r"error: the training loss became nan or infinite in epoch 1, " + where
                                         + r"; .*continue with a lower optim.lr", errors[0]), done.stderr
    assert "Traceback" not in done.stderr and "Run the same command again" not in done.stderr
    assert not list((tmp_path / "r").glob("checkpoint-*"))


@pytest.mark.slow
def test_a_storm_of_stop_signals_to_the_ranks_still_ends_in_one_checkpoint_and_exit_3(tmp_path):
    # A signal handler runs between any two bytecodes, also inside the code of an earlier handler:
    # a stop request made with a lock (threading.Event) deadlocked a rank signalled twice quickly.
    _, _, process, ranks = two_ranks_training(tmp_path, epochs=40)
    for _ in range(300):
        for rank in ranks:
            os.kill(rank, signal.SIGUSR1)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err
    assert re.search(r"interrupted: \d+/40 epochs", out)
    assert out.rstrip().endswith("to continue: run the same command again (it resumes from the newest checkpoint there)")


def test_a_profile_name_is_looked_up_in_the_users_folder_then_among_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    mine = tmp_path / "config" / "gunn" / "profiles"
    assert options.user_profiles() == mine
    packaged = Path(options.__file__).parent / "profiles"
    assert options.find_profile("dev") == packaged / "dev.yaml"  # nothing of the user's yet
    assert {"dev", "example-gpu"} <= set(options.list_profiles())
    mine.mkdir(parents=True)
    (mine / "dev.yaml").write_text("partition: mine\n")  # the user's own wins over the packaged one
    (mine / "site.yaml").write_text("partition: site\ntime_min: 5\n")
    assert options.load_profile("dev") == {"partition": "mine"} and options.load_profile("site")["time_min"] == 5
    assert {"dev", "example-gpu", "site"} <= set(options.list_profiles())
    assert "site" in launcher.build_parser().format_help()
    elsewhere = tmp_path / "given.yaml"  # a file given by path comes first
    elsewhere.write_text("partition: given\n")
    assert options.load_profile(str(elsewhere)) == {"partition": "given"}
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert options.user_profiles() == tmp_path / "home" / ".config" / "gunn" / "profiles"


@pytest.mark.slow
def test_an_unknown_profile_is_an_error_that_says_where_it_looked(tmp_path):
    done = launch(["--cluster", "slurm", "--profile", "nosuch", "--print-config"], tmp_path)
    packaged = REPO / "gunn" / "cluster" / "profiles"
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert (f"error: no cluster profile 'nosuch' (looked for the file nosuch, {options.user_profiles()}/nosuch.yaml, "
            f"{packaged}/nosuch.yaml); profiles: ") in done.stderr, done.stderr
    missing = launch(["--cluster", "slurm", "--profile", "site/nosuch.yaml", "--print-config"], tmp_path)
    assert missing.returncode == 2 and "error: no cluster profile 'site/nosuch.yaml' (looked for the file " \
        "site/nosuch.yaml); profiles: " in missing.stderr, missing.stderr
    found = launch(["--cluster", "slurm", "--profile", "dev", "--print-config"], tmp_path)
    assert found.returncode == 0 and "name: digits" in found.stdout, found.stderr


def test_printed_commands_are_the_checkouts_scripts_here_and_the_entry_points_once_installed(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert commands.command("launch") == ["python", "jobs/launch.py"]
    assert commands.command("sweep", absolute=True) == ["python", str(REPO / "pipelines" / "sweep.py")]
    assert commands.program("report") == "python pipelines/report.py"
    monkeypatch.chdir(tmp_path)
    assert commands.command("launch") == ["python", str(REPO / "jobs" / "launch.py")]
    monkeypatch.setattr(commands, "CHECKOUT", tmp_path)  # an installed package: no scripts beside it
    assert [commands.command(name) for name in ("launch", "sweep", "report")] == \
        [["gunn-launch"], ["gunn-sweep"], ["gunn-report"]]
    assert commands.program("launch") == "gunn-launch"
