"""The whole sweep inside one Slurm allocation: the job that submitit runs on every node."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

from gunn.cluster.slurm import JOB_SIGNALS, RequeueingJob
from gunn.sweeps.experiment import drive, stop_on_signals
from gunn.sweeps.ray_nodes import RAY, auth_token, ray_head, ray_worker, wait_for_nodes
from gunn.train.distributed import job_port


class SweepJob(RequeueingJob):
    """The whole sweep inside one Slurm allocation: one task per node, a Ray node each.

    Task 0 starts the Ray head, waits for the other nodes and drives the sweep; the other
    tasks start Ray workers that join it. On SIGUSR2 (time limit, preemption) task 0 requeues
    the job and interrupts the sweep, and the requeued job resumes it from its directory;
    SIGTERM interrupts it. Both hold from the task's first instant (see gunn.cluster.slurm.job_python).
    """

    def __init__(self, args: argparse.Namespace, sweep_dir: Path, max_requeues: int) -> None:
        super().__init__(max_requeues)
        self.args, self.sweep_dir = args, sweep_dir

    def __call__(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        if env.global_rank == 0:
            def requeue(*_: Any) -> None:
                self.requeue(env.job_id, self.sweep_dir)
                signal.raise_signal(signal.SIGINT)

            signal.signal(signal.SIGUSR2, requeue)
            stop_on_signals()
        else:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # task 0 requeues the job
        signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)
        auth_token(self.sweep_dir, create=env.global_rank == 0)
        head = socket.gethostbyname(env.hostnames[0])
        port = job_port(env.job_id)
        cpus = float(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        # A Ray folder per node of this job: nodes that share /tmp (several on one host, as in
        # slurm/dev-cluster) would otherwise share sockets.
        temp = Path(tempfile.gettempdir()) / f"ray-{env.job_id}-{env.node}"
        done = self.sweep_dir / f"ray-done-{env.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if env.global_rank != 0:
            ray_worker([*RAY, "start", "--address", f"{head}:{port}", "--block", "--num-cpus", str(int(cpus)),
                         "--disable-usage-stats", "--temp-dir", str(temp)], done)
            if done.is_file() and done.read_text() != "1":
                shutil.rmtree(temp, ignore_errors=True)  # Ray's logs are kept when a trial failed
            return {"status": "worker", "summary": "Ray worker stopped"}
        done.unlink(missing_ok=True)
        status, failed = 1, True
        try:
            with ray_head(temp, ip=head, port=port, cpus=cpus, verbose=self.args.verbose) as (address, keep):
                wait_for_nodes(address, env.num_nodes)
                self.args.resume = True  # a requeued job continues the sweep it started
                status, failed = drive(self.args, self.sweep_dir, address)
                if failed:
                    keep.append("keep")
        finally:
            done.write_text("1" if failed else "0")  # tells the workers to stop their Ray nodes; 1: keep their logs
        ending = {0: "finished", 1: "had failed trials" if failed else "left MLflow records unsent",
                  3: "was interrupted"}.get(status, "failed")
        report = self.sweep_dir / "report"
        where = f", report in {report}" if (report / "report.csv").is_file() else ", no report written"
        return {"status": "finished" if status == 0 else "failed", "summary": f"sweep {self.sweep_dir.name} {ending}{where}"}
