"""Process group setup from torchrun's or Slurm's environment, and cross-rank reductions."""

from __future__ import annotations

import itertools
import os
import re
import signal
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from gunn.train.device import choose as choose_device

# The signals that ask a run to stop (launcher, Slurm jobs): Ctrl-C, SIGTERM, SIGUSR1, SIGUSR2.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


# The process group's rendezvous store (rank 0 hosts it): ``teardown`` uses it to leave in order.
_STORE: dist.Store | None = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None  # the process group's ("gloo", "nccl"); None: one process and no group

    @property
    def is_main(self) -> bool:
        """Only the main process prints, writes files and logs to MLflow."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether this process is in a process group (of one rank, too): then the ranks agree through collectives."""
        return self.backend is not None


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``node[01-03,7],gpu5``, ``rack[1-2]-node[01-02]-ib``) as host names, in the
    order ``scontrol show hostnames`` gives them."""
    if not re.fullmatch(r"[^\[\]]*(\[[^\[\]]*\][^\[\]]*)*", nodelist):
        raise ValueError(f"Slurm host list {nodelist!r}: unbalanced or nested brackets")
    hosts: list[str] = []
    # Commas and whitespace separate host expressions, except inside brackets.
    for expression in re.findall(r"(?:[^\s,\[]|\[[^\]]*\])+", nodelist):
        texts_and_groups = re.split(r"\[([^\]]*)\]", expression)
        texts, groups = texts_and_groups[0::2], []
        for group in texts_and_groups[1::2]:
            numbers: list[str] = []
            for item in group.split(","):
                match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item)
                if not match or int(match[2] or match[1]) < int(match[1]):
                    raise ValueError(f"Slurm host list {nodelist!r}: bad range {item!r} (want N or LO-HI, LO <= HI)")
                lo, hi = match[1], match[2] or match[1]
                numbers += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]  # zero padded as lo is
            groups.append(numbers)
        # scontrol's order (hostlist.c, _push_range_list): the last group varies fastest, then the
        # first, the second, ..., and the one before last slowest.
        for combo in itertools.product(*groups[-2::-1], *groups[-1:]):
            chosen = [*combo[-2::-1], *combo[-1:]]  # back in the order the groups are written
            hosts.append("".join(text + number for text, number in zip(texts, [*chosen, ""])))
    return hosts


def tasks_on_this_node(tasks_per_node: str, node_id: int) -> int:
    """This node's entry of Slurm's SLURM_TASKS_PER_NODE (``2(x3),1``: 2 on nodes 0-2, 1 on node 3)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[min(node_id, len(counts) - 1)]


def job_port(job_id: str | int) -> int:
    """The rendezvous port of Slurm job ``job_id`` (an array task's ``123_4`` counts as job 123), in
    20000-39999: one port per job, so that jobs sharing a node do not collide."""
    return 20000 + int(str(job_id).split("_")[0]) % 20000


def slurm_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of this Slurm task, from
    Slurm's variables (``env``, default ``os.environ``); MASTER_ADDR and MASTER_PORT, where set, are kept.
    The one mapping: ``environment`` falls back on it, and the launcher's Slurm jobs export it before training."""
    env = os.environ if env is None else env
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    local_world = tasks_on_this_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")),
                                     int(env.get("SLURM_NODEID", "0")))
    return {
        "RANK": env.get("SLURM_PROCID", "0"), "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": env.get("MASTER_ADDR", nodes[0]),
        "MASTER_PORT": env.get("MASTER_PORT", str(job_port(env.get("SLURM_JOB_ID", "0")))),
    }


def environment() -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them, else
    from Slurm."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"], "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "LOCAL_WORLD_SIZE": env.get("LOCAL_WORLD_SIZE", "1"),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return slurm_environment(env)
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


def cpu_threads(requested: int, local_world_size: int) -> int | None:
    """Intra-op threads for this process: ``requested`` if positive; else None (torch's own choice) when
    OMP_NUM_THREADS is set or this is the node's only rank; else Slurm's CPUs per task if set, otherwise
    the CPUs this process may use shared out among the node's ranks. Several ranks that each take every
    core oversubscribe it: thin CPU kernels then spend their time waiting for each other."""
    if requested > 0:
        return requested
    if "OMP_NUM_THREADS" in os.environ or local_world_size <= 1:
        return None
    available = len(os.sched_getaffinity(0))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:  # Slurm may already have bound this task to them
        return min(available, int(per_task))
    return max(1, available // local_world_size)


def setup(device: str = "auto", backend: str = "auto", threads: int = 0, timeout_s: float = 600.0) -> DistInfo:
    """Joins the process group the environment describes, picks the device and the number of CPU threads
    (see ``cpu_threads``).

    A group is formed when there are several processes, or when ``backend`` names one (``gloo``,
    ``nccl``): one process then forms a group of one rank, which runs every multi-rank code path
    (DDP, the collectives; NCCL's start-up on one GPU). With ``auto`` and one process there is no
    group. ``timeout_s``: how long a collective waits for the other ranks.
    """
    env = environment()
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    chosen_threads = cpu_threads(threads, int(env["LOCAL_WORLD_SIZE"]))
    if chosen_threads is not None:
        torch.set_num_threads(chosen_threads)
    target = choose_device(device, local)
    use_cuda = target.type == "cuda"
    if dist.is_initialized():  # the caller's own group
        return DistInfo(rank, world, local, target, dist.get_backend())
    if world == 1 and backend == "auto":
        return DistInfo(rank, world, local, target)
    chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    if chosen == "nccl" and not use_cuda:
        raise RuntimeError("dist.backend 'nccl' needs CUDA devices; use gloo on the CPU")
    _join(chosen, env, rank, world, target, timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, target, chosen)


def _join(backend: str, env: Mapping[str, str], rank: int, world: int, device: torch.device,
          timeout: timedelta) -> None:
    """Initialises the default process group, keeping its rendezvous store for ``teardown``."""
    global _STORE
    # The backend's threads (gloo's, NCCL's watchdog, the store's) start with the stop signals
    # blocked, so that a signal to the process reaches the main thread, where Python handles it,
    # instead of interrupting a communication thread's system call.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if world == 1:  # nobody else joins: a store in this process, and no port to find
            store: dist.Store = dist.HashStore()
        else:  # what init_process_group(init_method="tcp://...") does, keeping the store
            os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT")})
            store, _, _ = next(dist.rendezvous(f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}", rank, world,
                                               timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _STORE = store


def teardown(together: bool = True) -> None:
    """Leaves the process group, if one was joined.

    No rank waits here for rank 0, whose own work at the end (final weights, curves, MLflow
    model, a checkpoint's write) may outlast any collective timeout: with ``together`` (every rank
    got here after its last collective) the other ranks leave at once, each saying so in the
    rendezvous store, and rank 0, which hosts that store, waits until they have left before it
    leaves too (their NCCL watchdogs poll the store until they leave). Without ``together`` (an
    error) every rank leaves at once.
    """
    global _STORE
    if not dist.is_initialized():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    store, _STORE = _STORE, None
    dist.destroy_process_group()
    if not together or store is None or world == 1:
        return
    if rank != 0:
        store.set(f"gunn/left/{rank}", "1")
        return
    try:
        store.wait([f"gunn/left/{r}" for r in range(1, world)])  # the store's timeout: the collectives'
    except RuntimeError as err:  # DistStoreError: a rank that never got here (it failed; the launcher says so)
        warnings.warn(f"rank 0 leaves without word from every other rank ({err})", stacklevel=2)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all ranks, in place (nothing to do without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """The largest of each of ``values`` over all ranks (one collective, one read from the device)."""
    tensor = torch.tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_to_main(value: object) -> list[object] | None:
    """Every rank's ``value`` (picklable, CPU tensors only), in rank order, on rank 0; None elsewhere."""
    if not dist.is_initialized():
        return [value]
    main = dist.get_rank() == 0
    gathered: list[object] | None = [None] * dist.get_world_size() if main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def sync_batch_norm(model: nn.Module) -> tuple[nn.Module, int, int]:
    """Converts the BatchNorms outside GUNN/SUNN layers (stem, transitions, head) to SyncBatchNorm.

    The update units inside a GUNN layer keep per-rank BatchNorm: synchronising them would add
    two collectives per unit and step (hundreds per step on the paper's models) and turn off
    the GUNN fast path and the fused SUNN path, which need plain ``BatchNorm2d``. Returns the
    model and the numbers of converted and of per-rank BatchNorms.
    """
    from gunn.layers import GradualUpdate

    norm = nn.modules.batchnorm._BatchNorm

    def convert(module: nn.Module) -> tuple[nn.Module, int, int]:
        if isinstance(module, GradualUpdate):
            return module, 0, sum(isinstance(m, norm) for m in module.modules())
        if isinstance(module, norm):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module), 1, 0
        converted = kept = 0
        for name, child in module.named_children():
            new, c, k = convert(child)
            if new is not child:
                setattr(module, name, new)
            converted, kept = converted + c, kept + k
        return module, converted, kept

    return convert(model)


def average_buffers(module: torch.nn.Module) -> None:
    """Averages floating-point buffers (BatchNorm statistics) over all ranks, so every rank holds the same."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)


def check_identical(module: torch.nn.Module, device: torch.device) -> str:
    """Raises if the weights or buffers differ between ranks; returns a fingerprint of them."""
    with torch.no_grad():
        tensors = [t.detach().double().flatten() for t in [*module.parameters(), *module.buffers()]]
        flat = torch.cat(tensors) if tensors else torch.zeros(1, dtype=torch.float64)
        positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        # Sum and a position-weighted sum: a swap or a one-element difference changes one of them.
        fingerprint = torch.stack([flat.sum(), (flat * positions.remainder(9973)).sum()]).to(device)
    if dist.is_initialized():
        gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, fingerprint)
        differing = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differing:
            raise RuntimeError(f"the model differs between rank 0 and rank(s) {differing}: the ranks diverged")
    return "/".join(f"{v:.10e}" for v in fingerprint.tolist())


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
