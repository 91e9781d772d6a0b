"""Scale-out: `--shard I/N` slices, and torchrun ranks (RANK/WORLD_SIZE/LOCAL_RANK) as shards.

Under torchrun each rank takes slice RANK of WORLD_SIZE and GPU LOCAL_RANK; at the end every rank
sends its results to rank 0 (torch.distributed, gloo on CPU, nccl on CUDA), which merges them and writes
the summary, so no shared file system is needed for the merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" -> (I, N), with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard wants I/N (e.g. 0/4), got {text!r}") from e
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_slice(items: list, shard: tuple[int, int] | None) -> list:
    """Contiguous slice `I` of `N`, so items sharing an image stay on one worker."""
    if not shard:
        return items
    i, n = shard
    return items[len(items) * i // n : len(items) * (i + 1) // n]


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        import torch.distributed as td

        out = [None] * self.world if self.rank == 0 else None
        td.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def from_env(device: str) -> Dist | None:
    """Join the torchrun process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as td

    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    if not td.is_initialized():
        td.init_process_group(backend=backend)
    return d
