#!/usr/bin/env python
"""The comparison report of a sweep, rebuilt from MLflow (gunn.sweeps.report; installed: gunn-report). See --help."""

from gunn.cli import report

if __name__ == "__main__":
    raise SystemExit(report())
