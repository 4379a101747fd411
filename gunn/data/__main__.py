"""python -m gunn.data: data sets on disk (``download`` CIFAR, ``verify`` an ImageNet tree)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gunn.data.base import DataError


def _verify(args: argparse.Namespace) -> int:
    from gunn.data.imagenet import verify

    bad = verify(args.root, workers=args.workers)
    for path, why in bad:
        print(f"{path}: {why}")
    if bad:
        print(f"{len(bad)} unreadable image(s) under {args.root}: remove them before training", file=sys.stderr)
        return 1
    print(f"every image under {args.root}/train and {args.root}/val is readable", file=sys.stderr)
    return 0


def _download(args: argparse.Namespace) -> int:
    from torchvision.datasets import CIFAR10, CIFAR100

    reader = CIFAR10 if args.dataset == "cifar10" else CIFAR100
    args.root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        reader(str(args.root), train=train, download=True)
    print(f"{args.dataset} is in {args.root}: train with data.root={args.root}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task."""
    top = argparse.ArgumentParser(prog="python -m gunn.data", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify = commands.add_parser(
        "verify", help="list every image of an ImageNet tree that cannot be decoded",
        description="Decode every image under ROOT/train and ROOT/val and list those that fail, "
        "with the reason. Exit status 1 if any fails: a training run stops at the first one.",
    )
    verify.add_argument("root", type=Path, help="the directory that holds train/ and val/")
    verify.add_argument("--workers", type=int, default=None, help="decoding threads (default: one per CPU)")
    verify.set_defaults(run=_verify)
    download = commands.add_parser(
        "download", help="download CIFAR-10 or CIFAR-100 (needs internet access)",
        description="Download a CIFAR data set with torchvision into ROOT (the directory given as data.root).",
    )
    download.add_argument("dataset", choices=["cifar10", "cifar100"])
    download.add_argument("--root", type=Path, required=True, help="directory to download into (data.root)")
    download.set_defaults(run=_download)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; exit status 0 on success, 1 if it found problems, 2 on bad input."""
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
