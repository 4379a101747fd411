"""Sending a journal after the fact: ``python -m gunn.train.tracking sync RUN_DIR``, and completing
the record of a run whose own process could not (`complete`)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from gunn.train.tracking.journal import (
    FINAL_STATUSES,
    JOURNAL_NAME,
    MODEL_DIR_NAME,
    MODEL_NAME,
    Journal,
    clean_tags,
    sync_command,
)
from gunn.train.tracking.sender import ParentNotSent, brief, is_rejection, Sender

__all__ = ["complete", "main", "model_step", "sync", "sync_command"]

_log = logging.getLogger(__package__)
DESCRIPTION = "MLflow tracking of a training run that survives the tracking server going away."


def sync(run_dir: Path, *, final_status: str | None = None, tracking_uri: str | None = None) -> tuple[int, int]:
    """Send what the journal in `run_dir` holds but MLflow never got; return (sent, still unsent).

    `tracking_uri`: where the store is now, when it moved (a server on another host or port, a
    database file elsewhere): every unsent record goes there, into the run it already has there."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / JOURNAL_NAME
    if not path.exists():
        raise FileNotFoundError(f"no MLflow journal {path} in run_dir {run_dir}")
    if final_status is not None and final_status not in FINAL_STATUSES:
        raise ValueError(f"final_status must be one of {FINAL_STATUSES}, got {final_status!r}")
    journal = Journal(path)
    last_op = max(journal.work, key=lambda r: r["seq"])["op"] if journal.work else None
    if final_status is not None and last_op not in (None, "finish"):
        journal.append(
            {"seq": journal.next_seq, "op": "finish", "time": int(time.time() * 1000), "status": final_status}
        )
    pending = journal.pending()
    if tracking_uri is not None:
        from gunn.train.tracking.store import resolve_tracking_uri

        moved_to = resolve_tracking_uri(tracking_uri)
        for old in {r["_uri"] for r in pending} - {moved_to}:
            if old in journal.runs and moved_to not in journal.runs:  # the same run, found at its new address
                journal.append({"run_id": journal.runs[old], "tracking_uri": moved_to})
        pending = [{**r, "_uri": moved_to} for r in pending]
    sender = Sender(journal)
    sent, unsent, unreachable = 0, 0, set()
    for record in pending:
        if record["_uri"] in unreachable:  # keeps each store's calls in order
            unsent += 1
            continue
        try:
            sender.send(record)
            sent += 1
        except Exception as e:  # noqa: BLE001 - reported, and the record stays in the journal
            if is_rejection(e):
                sender.reject(record, e)
                _log.warning("MLflow refused the %s call #%d: %s", record["op"], record["seq"], e)
            elif isinstance(e, ParentNotSent):
                _log.error("%s", e)
                unreachable.add(record["_uri"])
                unsent += 1
            else:
                _log.error("Could not reach MLflow at %s: %s", record["_uri"], brief(e))
                unreachable.add(record["_uri"])
                unsent += 1
    return sent, unsent


def complete(
    run_dir: Path, status: str, *, tags: dict[str, str] | None = None, artifacts: tuple[Path, ...] = ()
) -> tuple[int, int]:
    """Makes the run of `run_dir` end as `status` (with `tags`), with `artifacts` logged once, and its
    MLflow model (``MODEL_DIR_NAME``, if the run saved one) too if FINISHED, and sends what its journal holds;
    (sent, still unsent). For a run whose own process may have ended it
    otherwise, or not at all (killed): the caller knows better, e.g. a sweep knows that its
    scheduler stopped a trial. Hold the run directory's lock: no other process may write here."""
    run_dir = Path(run_dir).resolve()
    if status not in FINAL_STATUSES:
        raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
    journal = Journal(run_dir / JOURNAL_NAME)
    if not journal.work:
        return 0, 0  # the run never started tracking
    logged = journal.artifacts()
    for path in artifacts:
        path = Path(path).resolve()
        if path.exists() and (str(path), None) not in logged:
            journal.append({"seq": journal.next_seq, "op": "artifact", "time": int(time.time() * 1000),
                            "path": str(path), "artifact_path": None})
    model_dir = run_dir / MODEL_DIR_NAME
    if (status == "FINISHED" and (model_dir / "MLmodel").is_file()
            and not any(p == str(model_dir) for p, _, _ in journal.models())):
        # Saved by a process that died before it journaled it.
        journal.append({"seq": journal.next_seq, "op": "model", "time": int(time.time() * 1000),
                        "path": str(model_dir), "name": MODEL_NAME, "step": model_step(model_dir)})
    recorded: dict[str, str] = {}
    for record in sorted(journal.work, key=lambda r: r["seq"]):
        recorded.update(record.get("tags", {}) if record["op"] in ("start", "tags") else {})
    tags = {k: v for k, v in clean_tags(tags or {}).items() if recorded.get(k) != v}
    if journal.ending() != status or tags:
        if tags:
            journal.append({"seq": journal.next_seq, "op": "tags", "time": int(time.time() * 1000), "tags": tags})
        journal.append({"seq": journal.next_seq, "op": "finish", "time": int(time.time() * 1000), "status": status})
    return sync(run_dir)


def model_step(model_dir: Path) -> int:
    """The step (epoch) that the engine saved in an MLflow model's MLmodel (metadata ``gunn``); 0 if none."""
    import yaml

    try:
        meta = (yaml.safe_load((Path(model_dir) / "MLmodel").read_text()).get("metadata") or {}).get("gunn") or {}
        return int(meta.get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m gunn.train.tracking sync RUN_DIR`."""
    parser = argparse.ArgumentParser(prog="python -m gunn.train.tracking", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser("sync", help="send the tracking calls MLflow has not received")
    sync_parser.add_argument("run_dir", type=Path)
    sync_parser.add_argument(
        "--status",
        choices=FINAL_STATUSES,
        default=None,
        help="end the run with this status if training stopped without ending it (e.g. killed)",
    )
    sync_parser.add_argument(
        "--tracking-uri",
        default=None,
        help="where the store is now, if it moved since the run logged to it (its run keeps its id there)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not (args.run_dir / JOURNAL_NAME).exists():
        parser.error(f"no {JOURNAL_NAME} in {args.run_dir}")
    sent, unsent = sync(args.run_dir, final_status=args.status, tracking_uri=args.tracking_uri)
    journal = Journal(args.run_dir.resolve() / JOURNAL_NAME)
    runs = ", ".join(f"{run_id} at {uri}" for uri, run_id in journal.runs.items()) or "none"
    print(f"sent {sent} call(s), {unsent} still unsent; MLflow run: {runs}")
    if journal.work and max(journal.work, key=lambda r: r["seq"])["op"] != "finish":
        print("note: the run was not ended (still running, or killed); pass --status KILLED to end it")
    return 1 if unsent else 0
