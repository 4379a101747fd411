"""Running training jobs: the launcher (``launch``: in this process, local processes or Slurm;
``python -m gunn.cluster.launch``, ``gunn-launch``), the cluster options and profiles
(``options``; the profiles that come with gunn are in ``profiles/``), Slurm itself (``slurm``:
submission through submitit, partition checks, following jobs, requeueing) and the commands
that messages print (``commands``)."""
