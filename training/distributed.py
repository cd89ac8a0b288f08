"""torchrun's environment when present, one process otherwise (nanoGPT's fifteen lines), and DDP around a module."""
import inspect
import os

import torch
import torch.distributed as dist
import torch.nn as nn


class Dist:
    def __init__(self, rank=0, local_rank=0, world=1, device=torch.device("cpu")):
        self.rank, self.local_rank, self.world, self.device = rank, local_rank, world, device
        self.is_main = rank == 0


def setup_distributed(device=None):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; nccl on GPUs, gloo on CPUs."""
    if int(os.environ.get("RANK", -1)) == -1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(device=dev)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)     # before init_process_group
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, local_rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


def all_reduce_(t, op=None):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def wrap_ddp(module, d):
    """DDP over `module` when there are several processes; the module itself otherwise."""
    if d.world == 1:
        return module
    # The buffers (Swin's position indices, the target tokenizers' projections) are constants: no broadcast
    # before every forward. torch 2.13 renamed the option (the new one still syncs once at start: harmless).
    ddp_params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_params
                      else {"broadcast_buffers": False})
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, **no_buffer_sync)
