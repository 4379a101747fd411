#!/usr/bin/env python
"""Ablation sweeps with Ray Tune (gunn.sweeps.driver; installed: gunn-sweep). See --help."""

from gunn.cli import sweep

if __name__ == "__main__":
    raise SystemExit(sweep())
