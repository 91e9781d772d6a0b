"""Kernel benchmarks: prefill attention TFLOP/s, decode attention HBM GB/s, patch embedding images/s,
fused rotary + KV write against the two kernels it replaces.

    python benches/bench_kernels.py [--sweep]  # on a CUDA GPU; writes benches/results/kernels-<gpu>.{md,json}
    python benches/bench_kernels.py --dry-run  # tiny shapes; on the CPU under TRITON_INTERPRET=1

Prefill: causal, head dim 128, bf16, batch x seq_len = 16k tokens and 16 heads throughout (the
flash-attention paper's setting), our paged kernel (16-token blocks, shuffled) against torch SDPA's
flash backend and flash-attn (when installed) on contiguous tensors. FLOPs count the causal half.
Decode: Llama-3-8B shapes (32 query / 8 KV heads, dim 128), bytes = the K/V actually read + q + out,
against the device's copy bandwidth (read + write of a 2 GiB buffer).
Patch embedding: CLIP ViT-L/14 (1024 wide), against Conv2d + cat + add as transformers' CLIP runs it.
Rotary + KV write: the decode heads above, q/k/v strided views of one projection, from one token (batch-1
decode) to a prefill chunk; `rotary_write_kv` against `rotary_embedding` then `write_kv`.
Every time is the median over replays of a CUDA graph of the call (triton's do_bench_cudagraph): the
kernels' own time, not Python's launch overhead. `--sweep` adds the tile/launch variants.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from cultengine.attention_metadata import AttentionMetadata  # torch and numpy only: safe before TRITON_INTERPRET

RESULTS = Path(__file__).resolve().parent / "results"


def full_config():
    return dict(
        dtype=torch.bfloat16,
        prefill_tokens=16384,
        prefill_heads=16,
        head_dim=128,
        prefill_seqs=[512, 1024, 2048, 4096, 8192, 16384],
        decode_batches=[1, 4, 16, 64, 256],
        decode_contexts=[1024, 4096, 16384, 32768],
        decode_heads=(32, 8),
        decode_max_bytes=40e9,
        copy_bytes=2 << 30,
        patch_sizes=[224, 336],
        patch_batches=[1, 8, 32, 128, 256],
        embed_dim=1024,
        patch=14,
        sweep_seq=4096,
        sweep_decode=[(1, 8192), (1, 32768), (64, 8192), (256, 4096)],
        rotary_tokens=[1, 16, 64, 256, 2048, 8192],
    )


def dry_run_config():
    # fp32: the interpreter's bf16 dot is wrong, and only the plumbing is being checked here.
    return dict(
        dtype=torch.float32,
        prefill_tokens=256,
        prefill_heads=2,
        head_dim=64,
        prefill_seqs=[64, 128],
        decode_batches=[1, 2],
        decode_contexts=[64, 128],
        decode_heads=(4, 2),
        decode_max_bytes=1e9,
        copy_bytes=1 << 20,
        patch_sizes=[28],
        patch_batches=[1, 2],
        embed_dim=32,
        patch=14,
        sweep_seq=64,
        sweep_decode=[(1, 64)],
        rotary_tokens=[1, 5],
    )


def timer(dry_run: bool):
    """Median milliseconds of a callable: on the GPU, replays of a CUDA graph of it (kernel time, without
    the Python launch overhead a small decode call would otherwise be all about); a wall clock in the
    interpreter."""
    if dry_run:

        def wall(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return wall
    import triton.testing

    def graph_median(fn):
        # do_bench_cudagraph runs on a side stream: inputs made on the default stream must be ready.
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")

    return graph_median


def paged_cache(batch, seq_len, hkv, d, dtype, device, block_size=16):
    """Filled K/V caches holding `batch` sequences of `seq_len` tokens in shuffled physical blocks."""
    n_blk = -(-seq_len // block_size)
    tables = torch.randperm(batch * n_blk, device=device).view(batch, n_blk).to(torch.int32)
    shape = (batch * n_blk, block_size, hkv, d)
    caches = [torch.randn(shape, dtype=dtype, device=device) for _ in range(2)]
    return caches[0], caches[1], tables


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)  # the dry run's fp32 has no flash kernel
    backend = SDPBackend.FLASH_ATTENTION if flash else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def prefill_row(ops, kernels, bench, device, b, s, h, d, dtype, flash_attn_func):
    q = torch.randn(b * s, h, d, dtype=dtype, device=device)
    k_cache, v_cache, tables = paged_cache(b, s, h, d, dtype, device)
    qsl = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=device)
    seq_lens = torch.full((b,), s, dtype=torch.int32, device=device)
    meta = AttentionMetadata(qsl, seq_lens, tables, torch.empty(0, dtype=torch.int64), s, s)
    # Contiguous [B, S, H, D] copies for the baselines (the same numbers the paged cache holds).
    qc = q.view(b, s, h, d)
    kc, vc = (c[tables.long()].view(b, s, h, d) for c in (k_cache, v_cache))

    def tflops(fn):
        return 4 * b * h * s * s * d / 2 / (bench(fn) * 1e-3) / 1e12

    row = {
        "seq_len": s,
        "batch": b,
        "heads": h,
        "head_dim": d,
        "triton_paged": tflops(lambda: kernels.paged_attention(q, k_cache, v_cache, meta, d**-0.5)),
        "torch_sdpa_flash": tflops(lambda: sdpa_flash(qc, kc, vc)),
        "flash_attn": None,
    }
    if flash_attn_func:
        row["flash_attn"] = tflops(lambda: flash_attn_func(qc, kc, vc, causal=True))
    return row


def bench_prefill(cfg, ops, kernels, bench, device):
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    return [
        prefill_row(
            ops,
            kernels,
            bench,
            device,
            cfg["prefill_tokens"] // s,
            s,
            cfg["prefill_heads"],
            cfg["head_dim"],
            cfg["dtype"],
            flash_attn_func,
        )
        for s in cfg["prefill_seqs"]
    ]


def bench_copy_bandwidth(cfg, device) -> float:
    """Read + write GB/s of a large device-to-device copy, timed with events: inside a CUDA graph the
    copy becomes a memcpy node that ran ~20 % slower on an H100 (2,440 vs 3,008 GB/s)."""
    src = torch.empty(cfg["copy_bytes"], dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    else:
        ms = timer(dry_run=True)(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def decode_row(ops, kernels, bench, device, b, ctx, hq, hkv, d, dtype):
    k_cache, v_cache, tables = paged_cache(b, ctx, hkv, d, dtype, device)
    q = torch.randn(b, hq, d, dtype=dtype, device=device)
    meta = AttentionMetadata(
        torch.arange(b + 1, dtype=torch.int32, device=device),
        torch.full((b,), ctx, dtype=torch.int32, device=device),
        tables,
        torch.empty(0, dtype=torch.int64),
        1,
        ctx,
    )
    ms = bench(lambda: kernels.paged_attention(q, k_cache, v_cache, meta, d**-0.5))
    # Bytes that must cross HBM: every key and value of the batch once, q in, out back, the block tables.
    total = 2 * b * ctx * hkv * d * k_cache.element_size() + 2 * q.nbytes + tables.nbytes
    return {"batch": b, "context": ctx, "us": ms * 1e3, "gb_per_s": total / (ms * 1e-3) / 1e9}


def bench_decode(cfg, ops, kernels, bench, device):
    (hq, hkv), d, dtype = cfg["decode_heads"], cfg["head_dim"], cfg["dtype"]
    kv_bytes = lambda b, ctx: 2 * b * ctx * hkv * d * torch.finfo(dtype).bits // 8  # noqa: E731
    return [
        decode_row(ops, kernels, bench, device, b, ctx, hq, hkv, d, dtype)
        for b in cfg["decode_batches"]
        for ctx in cfg["decode_contexts"]
        if kv_bytes(b, ctx) <= cfg["decode_max_bytes"]
    ]


def conv_patch_embed(pixels, weight, cls, pos):
    """The vision tower's own path, as transformers' CLIP runs it: Conv2d, flatten, class token, add."""
    x = torch.nn.functional.conv2d(pixels, weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1) + pos[None]


def patch_row(kernels, bench, device, b, size, weight, cls, pos):
    pixels = torch.randn(b, 3, size, size, dtype=weight.dtype, device=device)
    ours = bench(lambda: kernels.patch_embed(pixels, weight, None, cls, pos))
    ref = bench(lambda: conv_patch_embed(pixels, weight, cls, pos))
    return {"image": size, "batch": b, "triton_img_per_s": b / (ours * 1e-3), "torch_conv_img_per_s": b / (ref * 1e-3)}


def bench_patch_embed(cfg, kernels, bench, device):
    e, p, dtype = cfg["embed_dim"], cfg["patch"], cfg["dtype"]
    rows = []
    for size in cfg["patch_sizes"]:
        weight = (0.02 * torch.randn(e, 3, p, p, device=device)).to(dtype)
        cls = torch.randn(e, dtype=dtype, device=device)
        pos = torch.randn(1 + (size // p) ** 2, e, dtype=dtype, device=device)
        rows += [patch_row(kernels, bench, device, b, size, weight, cls, pos) for b in cfg["patch_batches"]]
    return rows


def rotary_write_kv_row(kernels, bench, device, t, hq, hkv, d, dtype, block_size=16):
    qkv = torch.randn(t, hq + 2 * hkv, d, dtype=dtype, device=device)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)  # strided views, as the decoder's fused projection gives them
    cos, sin = (x.to(device) for x in torch.randn(2, 8192, d // 2).unbind(0))
    positions = torch.randint(0, 8192, (t,), device=device)
    num_blocks = -(-2 * t // block_size)
    k_cache, v_cache = (torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype, device=device) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, device=device)[:t]

    def separate():
        q_rot, k_rot = kernels.rotary_embedding(q, k, positions, cos, sin)
        kernels.write_kv(k_rot, v, k_cache, v_cache, slots)
        return q_rot

    fused = bench(lambda: kernels.rotary_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slots))
    unfused = bench(separate)
    return {"tokens": t, "fused_us": fused * 1e3, "separate_us": unfused * 1e3, "speedup": unfused / fused}


def bench_rotary_write_kv(cfg, kernels, bench, device):
    (hq, hkv), d, dtype = cfg["decode_heads"], cfg["head_dim"], cfg["dtype"]
    return [rotary_write_kv_row(kernels, bench, device, t, hq, hkv, d, dtype) for t in cfg["rotary_tokens"]]


# Tile and launch variants tried by --sweep: (BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill,
# (BLOCK_N, num_warps, num_stages) for decode. The first of each list is the engine's default at d = 128.
PREFILL_VARIANTS = [
    (128, 32, 8, 2),
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 32, 4, 2),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 2),
    (128, 128, 8, 2),
    (64, 128, 4, 2),
    (128, 64, 4, 3),
]
DECODE_VARIANTS = [
    (64, 8, 3),
    (64, 4, 3),
    (32, 4, 2),
    (32, 4, 3),
    (128, 8, 3),
    (128, 4, 2),
    (64, 8, 2),
    (64, 4, 4),
    (16, 4, 2),
]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def time_variants(variants, keys, run, rate, bench) -> list[dict]:
    """Each variant's rate, and its output's relative difference from the first variant's output."""
    rows, ref = [], None
    for variant in variants:
        row = dict(zip(keys, variant, strict=True))
        try:
            out = run(**row)
            ref = out if ref is None else ref
            row.update(rate=rate(bench(lambda row=row: run(**row))), rel_diff=rel_error(out, ref))
        except Exception as e:  # a variant that does not compile (shared memory, registers) is reported
            row.update(rate=None, rel_diff=None, error=str(e).splitlines()[0][:120])
        rows.append(row)
    return rows


def sweep(cfg, ops, kernels, bench, device) -> dict:
    """Tile/launch variants of the prefill (TFLOP/s) and decode (GB/s) attention kernels."""
    d, dtype, h = cfg["head_dim"], cfg["dtype"], cfg["prefill_heads"]
    s = cfg["sweep_seq"]
    b = cfg["prefill_tokens"] // s
    q = torch.randn(b * s, h, d, dtype=dtype, device=device)
    k_cache, v_cache, tables = paged_cache(b, s, h, d, dtype, device)
    qsl = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        qsl, torch.full((b,), s, dtype=torch.int32, device=device), tables, torch.empty(0, dtype=torch.int64), s, s
    )
    flops = 4 * b * h * s * s * d / 2
    prefill = time_variants(
        PREFILL_VARIANTS,
        ("block_m", "block_n", "num_warps", "num_stages"),
        lambda **kw: kernels.paged_prefill_attention(q, k_cache, v_cache, meta, d**-0.5, **kw),
        lambda ms: flops / (ms * 1e-3) / 1e12,
        bench,
    )
    decode = []
    hq, hkv = cfg["decode_heads"]
    for batch, ctx in cfg["sweep_decode"]:
        kc, vc, tab = paged_cache(batch, ctx, hkv, d, dtype, device)
        qd = torch.randn(batch, hq, d, dtype=dtype, device=device)
        md = AttentionMetadata(
            torch.arange(batch + 1, dtype=torch.int32, device=device),
            torch.full((batch,), ctx, dtype=torch.int32, device=device),
            tab,
            torch.empty(0, dtype=torch.int64),
            1,
            ctx,
        )
        nbytes = 2 * batch * ctx * hkv * d * kc.element_size() + 2 * qd.nbytes + tab.nbytes
        rows = time_variants(
            DECODE_VARIANTS,
            ("block_n", "num_warps", "num_stages"),
            lambda kc=kc, vc=vc, qd=qd, md=md, **kw: kernels.paged_decode_attention(qd, kc, vc, md, d**-0.5, **kw),
            lambda ms, nbytes=nbytes: nbytes / (ms * 1e-3) / 1e9,
            bench,
        )
        decode += [{"batch": batch, "context": ctx, **r} for r in rows]
    return {"prefill_seq": s, "prefill_batch": b, "prefill": prefill, "decode": decode}


def markdown(device_name: str, results: dict) -> str:
    def table(rows, columns):
        def fmt(v):
            if isinstance(v, float):
                return f"{v:,.1f}" if abs(v) >= 1 else f"{v:.3g}"
            return "-" if v is None else str(v)

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
        return "\n".join(lines)

    parts = [
        f"# Kernel benchmarks: {device_name}",
        f"dtype {results['dtype']}; copy bandwidth {results['copy_gb_per_s']:.0f} GB/s",
        "## Prefill attention, causal (TFLOP/s)",
        table(
            results["prefill"],
            ["seq_len", "batch", "heads", "head_dim", "triton_paged", "torch_sdpa_flash", "flash_attn"],
        ),
        "## Decode attention (achieved GB/s; copy bandwidth above)",
        table(results["decode"], ["batch", "context", "us", "gb_per_s"]),
        "## Patch embedding (images/s)",
        table(results["patch_embed"], ["image", "batch", "triton_img_per_s", "torch_conv_img_per_s"]),
        "## Rotary + KV write: fused kernel vs rotary_embedding then write_kv (µs)",
        table(results["rotary_write_kv"], ["tokens", "fused_us", "separate_us", "speedup"]),
    ]
    if "sweep" in results:
        sw = results["sweep"]
        parts += [
            f"## Tile sweep: prefill, seq {sw['prefill_seq']} x batch {sw['prefill_batch']} (rate in TFLOP/s; "
            "rel_diff = relative L2 difference from the first variant's output)",
            table(sw["prefill"], ["block_m", "block_n", "num_warps", "num_stages", "rate", "rel_diff"]),
            "## Tile sweep: decode (rate in GB/s)",
            table(sw["decode"], ["batch", "context", "block_n", "num_warps", "num_stages", "rate", "rel_diff"]),
        ]
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; runs on the CPU (Triton interpreter)")
    parser.add_argument("--out", type=Path, help="results folder (default benches/results; a temp dir for --dry-run)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time the tile/launch variants of the attention kernels (PREFILL_VARIANTS, DECODE_VARIANTS)",
    )
    args = parser.parse_args(argv)

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.dry_run:
        sys.exit(
            "bench_kernels: no CUDA device found; this benchmark needs an NVIDIA GPU "
            "(use --dry-run to check the script itself on the CPU)"
        )
    if not has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
    from cultengine import kernels, ops

    device = torch.device("cuda" if has_cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if has_cuda else "cpu-interpreter"
    cfg = dry_run_config() if args.dry_run else full_config()
    bench = timer(dry_run=not has_cuda)

    results = {
        "device": device_name,
        "dtype": str(cfg["dtype"]).removeprefix("torch."),
        "torch": torch.__version__,
        "dry_run": args.dry_run,
    }
    results["copy_gb_per_s"] = bench_copy_bandwidth(cfg, device)
    results["prefill"] = bench_prefill(cfg, ops, kernels, bench, device)
    results["decode"] = bench_decode(cfg, ops, kernels, bench, device)
    results["patch_embed"] = bench_patch_embed(cfg, kernels, bench, device)
    results["rotary_write_kv"] = bench_rotary_write_kv(cfg, kernels, bench, device)
    if args.sweep:
        results["sweep"] = sweep(cfg, ops, kernels, bench, device)

    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="bench-kernels-")) if args.dry_run else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels-{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}"
    text = markdown(device_name, results)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
