"""The training engine: one loop for every entry point (local runs, Slurm jobs, Ray Tune trials)."""
