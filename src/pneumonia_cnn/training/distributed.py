"""Data-parallel helpers: rank and world size from the environment ``torchrun`` sets, gathering, one stop flag."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from ..errors import PneumoniaCNNError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (1 without it), read before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device_name: str) -> Distributed:
    world_size = launched_world_size()
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda:"):
        raise PneumoniaCNNError(f"--device {device_name}: under torchrun each process uses the GPU of its local "
                                f"rank; use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        _check_one_gpu_per_process(local_rank, device_name)
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=float(os.environ.get("PNEUMONIA_CNN_DIST_TIMEOUT", "300")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return Distributed(rank, world_size, local_rank)


def _check_one_gpu_per_process(local_rank: int, device_name: str):
    """NCCL needs a GPU of its own for each process; without one, rank N fails deep inside CUDA."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    visible = torch.cuda.device_count()
    if max(processes, local_rank + 1) > visible:
        raise PneumoniaCNNError(
            f"--device {device_name}: torchrun started {processes} processes on this machine but only {visible} "
            f"CUDA device(s) are visible; start at most {visible} (--nproc-per-node {visible}) or use --device cpu")


def barrier(dist_info: Distributed):
    if dist_info.enabled:
        import torch.distributed as dist
        dist.barrier()


def gather_by_index(dist_info: Distributed, indices: np.ndarray, values: np.ndarray, total: int) -> np.ndarray:
    """Reassemble per-rank values so every rank sees exactly the single-process array."""
    out = np.empty(total)
    if not dist_info.enabled:
        out[indices] = values
        return out
    import torch.distributed as dist
    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, (indices, values))
    for rank_indices, rank_values in gathered:
        out[rank_indices] = rank_values
    return out


def gather_objects(dist_info: Distributed, value) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank: a collective, so all ranks call it."""
    if not dist_info.enabled:
        return [value]
    import torch.distributed as dist
    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_across_ranks(dist_info: Distributed, values: list[float], device) -> list[float]:
    if not dist_info.enabled:
        return list(values)
    import torch.distributed as dist
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(dist_info: Distributed, flag: bool, device) -> bool:
    """True on every rank when it is true on one: all ranks stop at the same step, or the others would hang."""
    if not dist_info.enabled:
        return flag
    import torch.distributed as dist
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def finish_distributed(dist_info: Distributed):
    # no final barrier: rank 0's end-of-run step (calibration, OOD fit, test metrics) may outlast the
    # collective timeout, and the other ranks have nothing left to do
    if dist_info.enabled:
        import torch.distributed as dist
        dist.destroy_process_group()
