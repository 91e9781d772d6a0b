"""This process's place among the tensor-parallel ranks (`TensorParallel`), as the weight loader and the decoder
see it: which share of the heads and rows to read, and the all-reduce that sums row-parallel products.
`parallel.py` starts the ranks; this bottom-layer module is what the checkpoint carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TensorParallel:
    """Rank `rank` of `world`; `group` carries the forward pass's all-reduces, `control` (gloo) the step
    messages rank 0 broadcasts."""

    rank: int
    world: int
    group: Any = None
    control: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x
