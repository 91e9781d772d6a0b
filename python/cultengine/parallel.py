"""Tensor parallelism: one process per rank over `torch.distributed` (gloo on the CPU, NCCL on CUDA).

Rank 0 is the engine's own process: its scheduler plans every step and its runner samples. Ranks 1..N-1 are
worker processes that hold their shards of the decoder and run each step's forward pass beside rank 0's,
on the inputs rank 0 broadcasts (the packed ids, positions, attention layout and image embeddings), so the
scheduler is unchanged and only rank 0 computes logits. The decoder's weights are split Megatron-style:
q/k/v and gate/up by output rows (column-parallel), o and down by input columns (row-parallel, summed with one
all-reduce each); KV heads are split across ranks, or replicated where there are fewer of them than ranks.
Embeddings and the lm_head are split by vocabulary rows (lookups summed, logits gathered); the vision tower
is replicated, and runs on rank 0 only (its embeddings go out with the step). The shard spec rides on the checkpoint
(`Checkpoint.tensor_parallel`), so every family's decoder reads only its slices of the safetensors.
"""

from __future__ import annotations

import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .shards import TensorParallel

# How long a rank waits on the others (a collective, a broadcast step) before it gives up: a worker that died
# or hangs is an error on rank 0 after at most this long, never a hang.
DEFAULT_TIMEOUT_S = 120.0


@dataclass
class WorkerSpec:
    """What a worker needs to build its shard of the model, as the engine was asked for it."""

    model: str
    dtype: str
    device: str
    random_init: bool
    attention_backend: str
    max_positions: int
    threads: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_of(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device.split(":")[0] == "cuda" else device


def _join(tp: TensorParallel, port: int, device: str, timeout_s: float) -> None:
    """Join rank `tp.rank` to the group (all ranks call this once their shards are built)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=tp.rank, world_size=tp.world, timeout=timeout
    )
    tp.group = dist.group.WORLD
    tp.control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else tp.group


def _to(obj, device):
    """`obj` with every tensor in it (tuples, lists, dicts, dataclasses) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{k: _to(getattr(obj, k), device) for k in obj.__dataclass_fields__})
    return obj


def _worker(rank: int, world: int, port: int, spec: WorkerSpec, status) -> None:
    """A worker rank (spawned: it inherits rank 0's environment): build this rank's shard, report ready (or the
    error), then run rank 0's steps."""
    from .ops import set_cpu_threads

    try:
        set_cpu_threads(spec.threads)
        device = _device_of(spec.device, rank)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        tp = TensorParallel(rank, world)
        model = _build_shard(spec, tp, device)
        status.put((rank, None))
    except BaseException:  # noqa: BLE001 - reported to rank 0 whatever it is
        status.put((rank, traceback.format_exc()))
        return
    _join(tp, port, device, spec.timeout_s)
    try:
        _serve(model, tp, device)
    finally:
        dist.destroy_process_group()


def _build_shard(spec: WorkerSpec, tp: TensorParallel, device: str):
    from .checkpoint import load_checkpoint
    from .models import SUPPORTED_ARCHITECTURES, family_for
    from .ops import Ops

    ckpt = load_checkpoint(
        spec.model,
        dtype=spec.dtype,
        device=torch.device(device),
        random_init=spec.random_init,
        architectures=SUPPORTED_ARCHITECTURES,
    )
    ckpt.tensor_parallel = tp
    return family_for(ckpt).build_model(Ops(spec.attention_backend), max_positions=spec.max_positions)


def _serve(model, tp: TensorParallel, device: str) -> None:
    """Run the steps rank 0 broadcasts until it says stop (or the group breaks: rank 0 is gone)."""
    kv_caches = hidden = None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=tp.control)
        kind, args = box[0]
        if kind == "stop":
            return
        args = _to(args, device)
        if kind == "kv":
            kv_caches = model.allocate_kv_caches(*args)
        elif kind == "copy":
            model.copy_blocks(kv_caches, *args)
        elif kind == "forward":
            hidden = model.forward(args[0], args[1], kv_caches, *args[2:])
        elif kind == "logits":  # the vocabulary-parallel lm_head: every rank computes its share
            model.compute_logits(hidden, *args)


class Workers:
    """Ranks 1..N-1 (processes) and rank 0's end of the group (this process)."""

    def __init__(self, world: int, spec: WorkerSpec):
        if dist.is_initialized():
            raise RuntimeError(
                "tensor_parallel_size > 1: this process already belongs to a torch.distributed group "
                "(another tensor-parallel Engine still open, or torchrun); close it first"
            )
        ctx = mp.get_context("spawn")
        self.port, self.spec, self.world = _free_port(), spec, world
        self.status = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world, self.port, spec, self.status), daemon=True, name=f"cultengine-tp{r}"
            )
            for r in range(1, world)
        ]
        for p in self.procs:
            p.start()
        self.closed = False
        self.tp = TensorParallel(0, world)  # its groups once every rank has built its shard (`join`)

    def join(self) -> None:
        """Wait until every worker has built its shard (a worker's error is raised here, with its traceback),
        then form the group."""
        import queue
        import time

        deadline, ready = time.monotonic() + self.spec.timeout_s, 0
        while ready < len(self.procs):
            try:
                rank, error = self.status.get(timeout=1.0)
            except queue.Empty:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"tensor parallel: workers not ready after {self.spec.timeout_s:.0f} s"
                    ) from None
                continue
            if error is not None:
                raise RuntimeError(f"tensor parallel rank {rank} failed to build its shard:\n{error}")
            ready += 1
        _join(self.tp, self.port, self.spec.device, self.spec.timeout_s)

    def send(self, kind: str, *args) -> None:
        """Broadcast one step message to the workers (tensors go as CPU copies)."""
        self.check_alive()
        try:
            dist.broadcast_object_list([(kind, _to(args, "cpu"))], src=0, group=self.tp.control)
        except RuntimeError as e:
            self.check_alive()
            raise RuntimeError(f"tensor parallel: broadcasting a step to the workers failed: {e}") from e

    def check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead and not self.closed:
            codes = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in dead)
            self.close(graceful=False)
            raise RuntimeError(f"tensor parallel worker died: {codes}; the engine cannot run on")

    def close(self, graceful: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if graceful and all(p.is_alive() for p in self.procs):
            try:
                dist.broadcast_object_list([("stop", ())], src=0, group=self.tp.control)
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(timeout=10 if graceful else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if self.tp.group is not None and dist.is_initialized():
            dist.destroy_process_group()


class TensorParallelModel:
    """Rank 0's model: the engine's `Model`, whose forward pass, logits and KV-cache operations also run on every
    worker (rank 0 broadcasts them first); image encoding stays on rank 0 (a replicated tower)."""

    def __init__(self, model, workers: Workers):
        self.model, self.workers = model, workers

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def allocate_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        self.workers.send("kv", num_blocks, block_size, dtype)
        return self.model.allocate_kv_caches(num_blocks, block_size, dtype)

    def copy_blocks(self, kv_caches, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.workers.send("copy", src, dst)
        self.model.copy_blocks(kv_caches, src, dst)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        self.workers.send("logits", rows)
        return self.model.compute_logits(hidden, rows)

    def forward(self, input_ids, positions, kv_caches, meta, image_rows=None, image_embeds=None):
        self.workers.send("forward", input_ids, positions, meta, image_rows, image_embeds)
        try:
            return self.model.forward(input_ids, positions, kv_caches, meta, image_rows, image_embeds)
        except RuntimeError as e:
            self.workers.check_alive()
            raise RuntimeError(f"tensor parallel: the forward pass failed: {e}") from e


def model_and_workers(checkpoint, family, ops, max_positions: int, world: int, threads: int | None = None):
    """The engine's model and its workers: on one rank the family's model and None; on `world` ranks this
    rank-0 shard wrapped in a `TensorParallelModel`, with the worker processes that hold the other shards."""
    if world == 1:
        return family.build_model(ops, max_positions=max_positions), None
    spec = WorkerSpec(
        model=str(checkpoint.path),
        dtype=str(checkpoint.dtype).removeprefix("torch."),
        device=str(checkpoint.device),
        random_init=checkpoint.random_init,
        attention_backend=ops.backend,
        max_positions=max_positions,
        threads=threads,
    )
    workers = Workers(world, spec)
    try:
        checkpoint.tensor_parallel = workers.tp
        model = family.build_model(ops, max_positions=max_positions)  # beside the workers building theirs
        workers.join()
        return TensorParallelModel(model, workers), workers
    except BaseException:
        workers.close(graceful=False)
        raise
