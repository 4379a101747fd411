"""Ablation sweeps with Ray Tune: the studies (``studies``), the driver and its command line
(``driver``: ``python -m gunn.sweeps.driver`` or ``gunn-sweep``), each sweep's own Ray
(``ray_nodes``), and the report rebuilt from MLflow (``report``: ``gunn-report``)."""
