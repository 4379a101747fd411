"""python -m gunn.data: data sets on disk. download fetches CIFAR-10 or CIFAR-100 (where there is internet
access); verify decodes every image of an ImageNet tree. See python -m gunn.data COMMAND --help."""

from __future__ import annotations

import argparse
import http.client
import shutil
import sys
import tarfile
import urllib.error
import zlib
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


# What a download that cannot finish raises: no network, a refused or broken connection, an HTTP error
# (URLError is an OSError), a truncated or corrupt archive (torchvision's MD5 check raises RuntimeError).
DOWNLOAD_ERRORS = (OSError, RuntimeError, EOFError, http.client.HTTPException, tarfile.TarError, zlib.error)


def _reason(err: BaseException) -> str:
    """Why a download failed, in words (urllib wraps the cause: ``<urlopen error [Errno 111] ...>``)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else err
        if not isinstance(err, BaseException):
            return str(err)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _download(args: argparse.Namespace) -> int:
    from torchvision.datasets import CIFAR10, CIFAR100

    reader = CIFAR10 if args.dataset == "cifar10" else CIFAR100
    root: Path = args.root
    made = [p for p in [root, *root.parents] if not p.exists()]  # deepest first: removed if it fails
    before = set(root.iterdir()) if root.is_dir() else set()
    done = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            reader(str(root), train=train, download=True)
        done = True
    except DOWNLOAD_ERRORS as err:
        print(f"error: could not download {args.dataset} from {reader.url}: {_reason(err).rstrip('.')}. Download it where "
              f"there is internet access and copy its folder into {root}", file=sys.stderr)
        return 1
    finally:
        if not done:  # nothing half-downloaded stays behind: the archive, its extracted folder, new folders
            for path in (set(root.iterdir()) - before) if root.is_dir() else ():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break
    print(f"{args.dataset} is in {root}: train with data.root={root}", file=sys.stderr)
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
        description="Download a CIFAR data set with torchvision into ROOT (the directory given as data.root). "
        "Without internet access it fails with the reason and leaves nothing behind: download it where there "
        "is access and copy the folder (cifar-10-batches-py/ or cifar-100-python/) into ROOT.",
    )
    download.add_argument("dataset", choices=["cifar10", "cifar100"], help="which data set")
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
