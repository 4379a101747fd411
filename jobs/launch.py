#!/usr/bin/env python
"""Launch a training run: python jobs/launch.py [PRESET | CONFIG.yaml] [section.field=value ...]

With no arguments it trains the digits demo in this process and logs to a local MLflow store.
``--nproc N`` runs N data-parallel processes on this machine (gloo on the CPU, NCCL on GPUs).
Everything is checked before any work starts; a bad value is reported with its field.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.data import DataError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python jobs/launch.py", description=__doc__.split("\n\n")[0],
        epilog=f"presets: {', '.join(cfgmod.list_presets())}. Fields: --fields.",
    )
    parser.add_argument("config", nargs="?", default=None, help="preset name or YAML file (default: digits)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. optim.epochs=10")
    parser.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (default 1)")
    parser.add_argument("--fields", action="store_true", help="list every configuration field and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    args = parser.parse_args(argv)
    # A first positional that looks like an override is one (the preset is then the default).
    if args.config is not None and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    return args


def resolve(args: argparse.Namespace) -> RunConfig:
    """The checked configuration, with its run directory fixed (all ranks and requeues share it)."""
    from gunn.train.engine import default_run_dir, validate

    config = cfgmod.load(args.config, args.overrides)
    validate(config, world_size=args.nproc)
    if config.checkpoint.dir is None:
        config.checkpoint.dir = str(default_run_dir(config))
    return config


def run_local(config: RunConfig, nproc: int) -> int:
    """Trains in this process, or in ``nproc`` local processes; returns an exit status."""
    from gunn.train.engine import request_stop, train

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"\nsignal {signal.Signals(signum).name}: checkpointing at the next batch (again to abort)",
              file=sys.stderr)
        request_stop()
        signal.signal(signum, signal.SIG_DFL)

    if nproc == 1:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, on_signal)
        result = train(config)
        print(f"{result.status}: {result.epochs_done}/{config.optim.epochs} epochs in {result.run_dir}")
        if result.mlflow_run_id:
            print(f"MLflow run {result.mlflow_run_id} at {result.tracking_uri}  (browse: mlflow ui "
                  f"--backend-store-uri {result.tracking_uri})")
        return 0 if result.status == "finished" else 3

    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_rank_main, args=(nproc, port, cfgmod.to_dict(config)), nprocs=nproc, start_method="spawn")
    print(f"finished: {nproc} processes, run directory {config.checkpoint.dir}")
    return 0


def _rank_main(rank: int, world_size: int, port: int, config: dict[str, Any]) -> None:
    from gunn.train.engine import request_stop, train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: request_stop())
    train(cfgmod.from_dict(config))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fields:
        print(cfgmod.help_text())
        return 0
    try:
        config = resolve(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfgmod.dump(config), end="")
        return 0
    return run_local(config, args.nproc)


if __name__ == "__main__":
    sys.exit(main())
