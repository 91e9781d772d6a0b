"""How close a step comes to the hardware bound: decode vs memory bandwidth, prefill vs matmul peak.

    .venv/bin/python benches/bench_bound.py                         # CUDA: llava-1.5-7b shapes, bf16, random weights
    .venv/bin/python benches/bench_bound.py --preset qwen2-7b
    .venv/bin/python benches/bench_bound.py --quick                 # fewer steps
    .venv/bin/python benches/bench_bound.py --dry-run               # CPU, demo checkpoint: checks the arithmetic

Decode: a step of B sequences (B = 1, 8, 32) with `--context` tokens each must read every decoder
weight once (all layers' matrices and norms, the final norm, the LM head; the embedding table only
for B rows, not counted) plus every cached key and value of the batch. Its lower bound is those
bytes / the device's copy bandwidth (read + write of a large buffer, torch `copy_`).
Prefill: one sequence of `--prefill-len` tokens; FLOPs = 2 x tokens x decoder matmul parameters +
causal attention (2 x P^2 x query width per layer) + the LM head for the one sampled row. Its bound is
FLOPs / the peak of a large bf16 matmul (torch). Text-only prompts: the vision tower is not timed.

Steps run through the engine's own loop (`Engine.step`: scheduler, runner, logits, sampler, update),
timed with the device synchronised; the decode figure is the median over `--steps` steps.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402


def full_config() -> dict:
    return dict(
        batches=[1, 8, 32],
        context=1024,
        prefill_lens=[512, 2048],
        steps=32,
        copy_bytes=2 << 30,
        matmul=8192,
        matmul_dtype=torch.bfloat16,
        reps=20,
    )


def dry_run_config() -> dict:
    return dict(
        batches=[1, 2],
        context=64,
        prefill_lens=[64],
        steps=4,
        copy_bytes=16 << 20,
        matmul=256,
        matmul_dtype=torch.float32,
        reps=3,
    )


def device_timer(device: torch.device):
    """Median seconds of a callable, after a warm-up call: CUDA events on the GPU, a wall clock otherwise."""

    def run(fn, reps: int) -> float:
        fn()
        bench_common.sync(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return bench_common.median(times)

    return run


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    """Bytes per second moved by `dst.copy_(src)` (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = device_timer(device)(lambda: dst.copy_(src), reps)
    return 2 * nbytes / seconds


def matmul_peak(device, n: int, dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = device_timer(device)(lambda: a @ b, reps)
    return 2 * n**3 / seconds


def model_arithmetic(engine) -> dict:
    """Bytes and FLOP coefficients of the engine's decoder."""
    lm = engine.model.language_model
    c = lm.cfg
    layer_bytes = sum(
        t.numel() * t.element_size() for layer in lm.layers for t in layer.values() if isinstance(t, torch.Tensor)
    )
    matmul_params = sum(layer[k].numel() for layer in lm.layers for k in ("qkv", "o", "gate_up", "down"))
    head = lm.lm_head.numel() * lm.lm_head.element_size() + lm.norm.numel() * lm.norm.element_size()
    kv_elem = engine.runner.kv_caches[0][0].element_size()
    return {
        "weight_bytes": layer_bytes + head,
        "matmul_params": matmul_params,
        "lm_head_params": lm.lm_head.numel(),
        "num_layers": c.num_layers,
        "q_width": c.num_heads * c.head_dim,
        "kv_bytes_per_token": 2 * c.num_layers * c.num_kv_heads * c.head_dim * kv_elem,
    }


def prefill_flops(arith: dict, p: int) -> float:
    linear = 2 * p * arith["matmul_params"]
    attention = arith["num_layers"] * 2 * p * p * arith["q_width"]  # QK^T + PV, causal half of 4 P^2 d
    return linear + attention + 2 * arith["lm_head_params"]


class _PlanRecorder:
    """Stands in for the engine's scheduler and keeps the last step plan, to tell prefill from decode."""

    def __init__(self, inner):
        self.inner, self.plan = inner, None

    def schedule(self):
        self.plan = self.inner.schedule()
        return self.plan

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_steps(engine, batch: int, prompt_len: int, max_tokens: int, seed: int) -> list[tuple[int, int, float]]:
    """Add `batch` text-only sequences of `prompt_len` random tokens; return (tokens, max_query_len,
    seconds) of every engine step until they finish."""
    rng = np.random.default_rng(seed)
    vocab = min(engine.tokenizer.vocab_size, engine.model.vocab_size)
    specials = set(engine.checkpoint.eos_token_ids) | {engine.family.placeholder_id}
    recorder = _PlanRecorder(engine.scheduler)
    engine.scheduler = recorder
    overlap, engine.overlap_scheduling = engine.overlap_scheduling, False  # one timed step = one plan
    steps = []
    try:
        for _ in range(batch):
            ids = [int(t) for t in rng.integers(0, vocab, prompt_len) if int(t) not in specials][:prompt_len]
            engine.add_request(engine.preparer.from_token_ids(ids), max_tokens=max_tokens, ignore_eos=True)
        while engine.scheduler.has_unfinished():
            bench_common.sync(engine.device)
            t = time.perf_counter()
            finished = engine.step()[0]
            bench_common.sync(engine.device)
            steps.append((len(recorder.plan.input_ids), int(recorder.plan.max_query_len), time.perf_counter() - t))
            for seq in finished:
                engine.release(seq.seq_id)
    finally:
        engine.scheduler = recorder.inner
        engine.overlap_scheduling = overlap
    return steps


def decode_phases(engine, context: int, steps: int) -> dict:
    """Milliseconds per decode step in each phase of the engine's step at batch 1 (its profile mode,
    which synchronises the device around each phase), the one prefill step left out."""
    engine.clock.enabled = True
    engine.clock.reset()
    try:
        run_steps(engine, 1, context, 2, seed=5)  # one prefill + one decode step: subtracted below
        once = dict(engine.clock.phase_seconds)
        run_steps(engine, 1, context, steps + 2, seed=5)
    finally:
        engine.clock.enabled = False
    return {k: (engine.clock.phase_seconds[k] - 2 * once[k]) / steps * 1e3 for k in once if k != "prefill"}


def trace_decode(engine, context: int) -> str:
    """torch.profiler's table of the device kernels of a few batch-1 decode steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_steps(engine, 1, context, 6, seed=6)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-1.5-7b", help="shape preset with random weights")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default=None, help="attention backend (default: triton on CUDA)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence in the decode steps")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed per batch size")
    parser.add_argument("--quick", action="store_true", help="fewer decode steps, one prefill length")
    parser.add_argument("--trace", action="store_true", help="print torch.profiler's kernel table of batch-1 decode")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, demo checkpoint, tiny sizes: checks the arithmetic"
    )
    parser.add_argument("--out", type=Path, help="results folder (default benches/results; a temp dir for --dry-run)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(
            "bench_bound: no CUDA device found; this benchmark compares GPU step times with the GPU's memory "
            "bandwidth and matmul peak (use --dry-run to check the script on the CPU with the demo checkpoint)"
        )
    cfg = dry_run_config() if args.dry_run else full_config()
    if args.quick:
        cfg.update(steps=min(cfg["steps"], 8), prefill_lens=cfg["prefill_lens"][:1])
    for key in ("context", "batches", "prefill_lens", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = "float32" if args.dry_run else args.dtype

    copy_bw = copy_bandwidth(device, cfg["copy_bytes"], cfg["reps"])
    peak = matmul_peak(device, cfg["matmul"], cfg["matmul_dtype"], cfg["reps"])
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s, matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)

    from cultengine import Engine
    from cultengine.bench import demo_checkpoint
    from cultengine.profile import preset_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-bound-"))
    try:
        if args.dry_run:
            model, name, random_init = demo_checkpoint.ensure(), "demo checkpoint", False
        else:
            model, name, random_init = preset_checkpoint(args.preset, tmp / args.preset), args.preset, True
        longest = max([cfg["context"] + cfg["steps"] + 8] + [p + 8 for p in cfg["prefill_lens"]])
        engine = Engine(
            str(model),
            device=str(device),
            dtype=dtype,
            random_init=random_init,
            attention_backend=args.backend,
            max_num_seqs=max(cfg["batches"]),
            max_num_batched_tokens=max([max(cfg["prefill_lens"]), 8192]),
            max_model_len=longest,
        )
        arith = model_arithmetic(engine)
        run_steps(engine, 2, 16, 3, seed=1)  # warm-up (kernels compiled, caches allocated)

        decode_rows = []
        graphs = engine.runner.decode_graphs
        for b in cfg["batches"]:
            ctx = cfg["context"] + cfg["steps"] // 2  # mean KV length over the timed steps
            nbytes = arith["weight_bytes"] + b * ctx * arith["kv_bytes_per_token"]
            bound = nbytes / copy_bw
            row = {
                "batch": b,
                "context": ctx,
                "bound_ms": bound * 1e3,
                "weight_gb": arith["weight_bytes"] / 1e9,
                "kv_gb": b * ctx * arith["kv_bytes_per_token"] / 1e9,
                "eager_ms": None,
            }
            # With CUDA graphs, then (same engine, graphs set aside) eagerly: what the graphs save.
            for key, use_graphs in (("step_ms", True), ("eager_ms", False)):
                if not use_graphs and graphs is None:
                    continue
                engine.runner.decode_graphs = graphs if use_graphs else None
                steps = run_steps(engine, b, cfg["context"], cfg["steps"] + 1, seed=b)
                decode = [s for s in steps if s[1] == 1][1:]  # drop the first decode step
                row[key] = bench_common.median([s[2] for s in decode]) * 1e3
            engine.runner.decode_graphs = graphs
            seconds = row["step_ms"] / 1e3
            row.update(of_bound=bound / seconds, gb_s=nbytes / seconds / 1e9, tok_s=b / seconds)
            decode_rows.append(row)
            print(
                f"decode batch {b}: {row['step_ms']:.2f} ms/step (eager {row['eager_ms']}), bound {bound * 1e3:.2f} ms",
                flush=True,
            )

        phases = decode_phases(engine, cfg["context"], cfg["steps"])
        print("batch-1 decode step, ms per phase:", {k: round(v, 3) for k, v in phases.items()}, flush=True)
        if args.trace and device.type == "cuda":
            print(trace_decode(engine, cfg["context"]), flush=True)

        prefill_rows = []
        for p in cfg["prefill_lens"]:
            times = []
            for r in range(3):
                steps = run_steps(engine, 1, p, 1, seed=100 + r)
                times.append(sum(s[2] for s in steps if s[1] > 1))
            seconds = bench_common.median(times)
            flops = prefill_flops(arith, p)
            prefill_rows.append(
                {
                    "tokens": p,
                    "ms": seconds * 1e3,
                    "bound_ms": flops / peak * 1e3,
                    "of_bound": flops / peak / seconds,
                    "tflop_s": flops / seconds / 1e12,
                    "tok_s": p / seconds,
                }
            )
            print(f"prefill {p}: {seconds * 1e3:.1f} ms, bound {flops / peak * 1e3:.1f} ms", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    env = bench_common.environment(device)
    md = "\n\n".join(
        [
            f"# Step time vs hardware bound: {name} ({env['device']}{', dry run' if args.dry_run else ''})",
            f"{dtype}, backend {engine.ops.backend}{', decode from CUDA graphs' if graphs else ''}. "
            "A step is the engine's whole step (schedule, forward, logits, sampling, update). "
            f"Measured copy bandwidth {copy_bw / 1e9:,.0f} GB/s (read + write), "
            f"matmul peak {peak / 1e12:,.1f} TFLOP/s ({str(cfg['matmul_dtype']).removeprefix('torch.')}, "
            f"{cfg['matmul']}^3). Decoder weights {arith['weight_bytes'] / 1e9:.2f} GB, KV "
            f"{arith['kv_bytes_per_token'] / 1e3:.1f} kB per token.",
            "## Decode step (bound = (weight bytes + KV bytes) / copy bandwidth)",
            bench_common.table(
                decode_rows,
                ["batch", "context", "step_ms", "eager_ms", "bound_ms", "of_bound", "gb_s", "tok_s"],
                [
                    "batch",
                    "KV length",
                    "step ms",
                    "step ms without CUDA graphs",
                    "bound ms",
                    "bound / measured",
                    "achieved GB/s",
                    "tokens/s",
                ],
            ),
            "Where a batch-1 decode step's time goes (ms; the engine's profile mode, synchronised per phase): "
            + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
            + ".",
            "## Prefill, one sequence (bound = FLOPs / matmul peak)",
            bench_common.table(
                prefill_rows,
                ["tokens", "ms", "bound_ms", "of_bound", "tflop_s", "tok_s"],
                ["tokens", "ms", "bound ms", "bound / measured", "achieved TFLOP/s", "tokens/s"],
            ),
        ]
    )
    data = {
        "bench": "bound",
        "env": env,
        "model": name,
        "dtype": dtype,
        "dry_run": args.dry_run,
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()},
        "copy_bytes_per_s": copy_bw,
        "matmul_flop_s": peak,
        "arithmetic": arith,
        "decode": decode_rows,
        "decode_phases_ms": phases,
        "prefill": prefill_rows,
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-bound-")) if args.dry_run else None)
    bench_common.write_results("bound", device, md, data, out)


if __name__ == "__main__":
    main()
