"""MLflow's system metrics (CPU, memory, disk, network, GPU) of this machine, logged to a run while it lasts.

Not journaled: they describe the moment they are taken, so samples taken while the server is
down are dropped, quietly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from gunn.train.tracking.sender import brief, short_http_timeouts

_log = logging.getLogger(__package__)

# MLflow's default for system metrics (mlflow.system_metrics): one sample every 10 s;
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL and ..._SAMPLES_BEFORE_LOGGING override it as in MLflow.
SYSTEM_METRICS_INTERVAL_S = 10.0


class SystemMetrics:
    """MLflow's system metrics of this machine, logged to one run from a thread of their own.

    The monitors are MLflow's (``mlflow.system_metrics``: CPU, memory, disk, network, and the
    NVIDIA or AMD GPUs when there are any), and so are the names (``system/cpu_utilization_percentage``,
    ``system/gpu_0_utilization_percentage``, ...) and steps (one per logged sample, continuing a
    resumed run's). MLflow's own ``SystemMetricsMonitor`` is not used: it needs a fluent active run
    or the process-wide tracking URI, stops for good at the first failed call, with a warning,
    and waits for MLflow's slow HTTP retries. Here each sample is logged once, with the short
    timeouts of the sender, and dropped if the server does not answer (debug log only); `stop`
    logs what was sampled since the last one, so that a run of a few seconds has a sample too.
    """

    def __init__(self, uri: str, run_id: str, interval: float, samples_before_logging: int = 1) -> None:
        self.uri, self.run_id = uri, run_id
        self.interval, self.samples_before_logging = interval, max(1, samples_before_logging)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gunn-mlflow-system-metrics", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Log a last sample and stop, waiting `timeout` seconds at most."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        with short_http_timeouts():
            monitors = self._monitors()
            if not monitors:
                return
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            client, step, samples = MlflowClient(tracking_uri=self.uri), None, 0
            while True:
                stopping = self._stop.wait(self.interval)
                for monitor in monitors:
                    try:
                        monitor.collect_metrics()
                    except Exception as e:  # noqa: BLE001 - a failing sensor costs its values, not the others'
                        _log.debug("System metrics: %s failed: %s", type(monitor).__name__, brief(e))
                samples += 1
                if samples >= self.samples_before_logging or stopping:
                    values: dict[str, float] = {}
                    for monitor in monitors:
                        try:
                            values.update(monitor.aggregate_metrics())
                        except Exception as e:  # noqa: BLE001
                            _log.debug("System metrics: %s failed: %s", type(monitor).__name__, brief(e))
                        monitor.clear_metrics()
                    samples = 0
                    try:
                        if values:
                            if step is None:
                                step = self._next_step(client)
                            now = int(time.time() * 1000)
                            client.log_batch(self.run_id, metrics=[
                                Metric(f"system/{k}", float(v), now, step) for k, v in values.items()])
                            step += 1
                    except Exception as e:  # noqa: BLE001 - the sender reports outages; a lost sample is no news
                        _log.debug("System metrics sample not logged to %s: %s", self.uri, brief(e))
                if stopping:
                    return

    def _next_step(self, client: Any) -> int:
        """The step after the run's last system metrics sample (a resumed run continues its steps)."""
        run = client.get_run(self.run_id)
        steps = [m.step for m in getattr(run.data, "_metric_objs", ()) if m.key.startswith("system/")]
        return max(steps) + 1 if steps else 0

    @staticmethod
    def _monitors() -> list[Any]:
        try:
            import psutil
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        except ImportError as e:
            _log.warning("MLflow system metrics are not logged: %s (install psutil, or set logging.system_metrics="
                         "false)", e)
            return []
        psutil.cpu_percent()  # the first sample then covers its interval, not the time since this process began
        monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        for module, name in (("gpu_monitor", "GPUMonitor"), ("rocm_monitor", "ROCMMonitor")):
            try:  # pynvml (nvidia-ml-py) for NVIDIA GPUs; both fail without a GPU
                monitors.append(getattr(__import__(f"mlflow.system_metrics.metrics.{module}", fromlist=[name]), name)())
                break
            except Exception as e:  # noqa: BLE001
                _log.debug("No %s system metrics: %s", name, brief(e))
        return monitors


def system_metrics_settings() -> tuple[float, int]:
    """The sampling interval (s) and samples per logged value: MLflow's variables if set, else 10 s and 1."""
    def number(name: str, kind: type, default: float | int) -> Any:
        raw = os.environ.get(name)
        try:
            return kind(raw) if raw else default
        except ValueError:
            _log.warning("Ignoring %s=%r: not a number", name, raw)
            return default

    interval = number("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", float, SYSTEM_METRICS_INTERVAL_S)
    return max(interval, 0.1), number("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", int, 1)

