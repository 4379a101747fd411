#!/usr/bin/env python
"""Launch a training run (gunn.cluster.launch; installed: gunn-launch). See --help."""

from gunn.cli import launch

if __name__ == "__main__":  # local ranks (spawn) import this file again
    raise SystemExit(launch())
