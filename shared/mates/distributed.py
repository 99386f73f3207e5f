"""Where a run computes: its device from the config's `device`, and joining torchrun's
process group (NCCL on CUDA, gloo on the CPU) for a stage trained with DDP."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mates.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device` is 'cuda' but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# How long a rank waits at a collective. The non-primary ranks wait at a barrier while
# rank 0 tokenizes the corpus of a fresh run, which takes longer than the NCCL default
# (10 minutes) on a large pool.
DIST_TIMEOUT = timedelta(hours=2)


def init_distributed(device_name: str) -> None:
    """Join the torchrun process group for a run configured with `device` `device_name`:
    NCCL with one GPU per local rank when the run is on CUDA, gloo when it is on the CPU
    (whatever GPUs the machine has)."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun local rank {local_rank} has no GPU of its own: this machine "
                f"has {torch.cuda.device_count()}; use --nproc-per-node at most that, "
                "or set `device: cpu`"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
