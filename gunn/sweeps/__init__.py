"""Ablation sweeps with Ray Tune: the studies, registered by name (``studies``), the command line
(``driver``: ``python -m gunn.sweeps.driver`` or ``gunn-sweep``), the sweep as one Ray Tune experiment
(``experiment``) whose trials run ``trainable``, the sweep's MLflow records (``records``), the whole sweep
in one Slurm allocation (``slurm_job``), each sweep's own Ray (``ray_nodes``), and the report rebuilt from
MLflow (``report``: ``gunn-report``)."""
