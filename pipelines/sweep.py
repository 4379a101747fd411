#!/usr/bin/env python
"""Ablation sweeps with Ray Tune (gunn.sweeps.driver; installed: gunn-sweep). See --help."""

from gunn.cluster.commands import sweep

if __name__ == "__main__":
    raise SystemExit(sweep())
