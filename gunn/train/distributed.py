"""Process group setup from torchrun's or Slurm's environment, and cross-rank reductions."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process prints, writes files and logs to MLflow."""
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``node[01-03,7],gpu5``) as host names, in order."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{width}d}")
    return hosts


def tasks_on_this_node(tasks_per_node: str, node_id: int) -> int:
    """This node's entry of Slurm's SLURM_TASKS_PER_NODE (``2(x3),1``: 2 on nodes 0-2, 1 on node 3)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[min(node_id, len(counts) - 1)]


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
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        job = int(env.get("SLURM_JOB_ID", "0"))
        local_world = tasks_on_this_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")),
                                         int(env.get("SLURM_NODEID", "0")))
        return {
            "RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(local_world),
            "MASTER_ADDR": env.get("MASTER_ADDR", nodes[0]),
            # One port per job, so that jobs sharing a node do not collide.
            "MASTER_PORT": env.get("MASTER_PORT", str(20000 + job % 20000)),
        }
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


def setup(device: str = "auto", backend: str = "auto", threads: int = 0) -> DistInfo:
    """Joins the process group the environment describes (if more than one process), picks the device and the
    number of CPU threads (see ``cpu_threads``)."""
    env = environment()
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    chosen_threads = cpu_threads(threads, int(env["LOCAL_WORLD_SIZE"]))
    if chosen_threads is not None:
        torch.set_num_threads(chosen_threads)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local % torch.cuda.device_count())
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        if chosen == "nccl" and not use_cuda:
            raise RuntimeError("dist.backend 'nccl' needs CUDA devices; use gloo on the CPU")
        os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT")})
        dist.init_process_group(
            chosen, init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}", rank=rank, world_size=world,
            device_id=target if chosen == "nccl" else None,
        )
    return DistInfo(rank, world, local, target)


def teardown(together: bool = True) -> None:
    """Leaves the process group, if one was joined: after a barrier when every rank gets here
    (``together``), so that no rank closes its connections while another still uses the group."""
    if dist.is_initialized():
        if together and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of ``values`` over all ranks (the values themselves with one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def average_buffers(module: torch.nn.Module) -> None:
    """Averages floating-point buffers (BatchNorm statistics) over all ranks, so every rank holds the same."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
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
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, fingerprint)
        differing = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differing:
            raise RuntimeError(f"the model differs between rank 0 and rank(s) {differing}: the ranks diverged")
    return "/".join(f"{v:.10e}" for v in fingerprint.tolist())


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
