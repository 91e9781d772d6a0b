"""Every Triton kernel launch the engine makes, recorded under the interpreter and compiled for a GPU.

`python kernel_launches.py record` (with TRITON_INTERPRET=1) calls each kernel wrapper in `cultengine.kernels`
at tiny shapes, for every variant the engine launches (dtypes, constexpr switches, split counts), and prints
the launches as JSON: kernel, argument types, constexpr values, launch options. `python kernel_launches.py
compile` (without it) reads the launches on stdin and compiles each with Triton's real compiler for an H100 (sm_90),
which needs no GPU. The interpreter runs code the compiler rejects; this is what catches it on a CPU.
"""

from __future__ import annotations

import json
import sys

DTYPE_CODES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "int32": "i32",
    "int64": "i64",
    "bool": "i1",
    "uint8": "u8",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def record() -> list[dict]:
    """Run every kernel wrapper once per variant under the interpreter, capturing each launch."""
    import inspect

    import torch
    import triton.runtime.interpreter as interpreter

    launches: list[dict] = []
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in params}
        signature, constexprs = {}, {}
        for name, value in bound.items():
            if "constexpr" in str(params[name].annotation):
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + DTYPE_CODES[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            else:
                signature[name] = "fp32"
        launches.append(
            {
                "module": self.fn.__module__,
                "kernel": self.fn.__name__,
                "signature": signature,
                "constexprs": constexprs,
                "options": {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs},
            }
        )
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    try:
        exercise()
    finally:
        interpreter.InterpretedFunction.run = run
    unique = {json.dumps(x, sort_keys=True) for x in launches}
    return [json.loads(x) for x in sorted(unique)]


def all_kernels() -> set[str]:
    """Names of the launchable kernels (`*_kernel`) in the package's kernel modules."""
    import importlib
    import pkgutil

    import triton.runtime.interpreter as interpreter

    from cultengine import kernels

    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name == "flash":  # flash-attn's kernels, not ours
            continue
        module = importlib.import_module(f"cultengine.kernels.{info.name}")
        names |= {
            n
            for n, v in vars(module).items()
            if n.endswith("_kernel") and isinstance(v, interpreter.InterpretedFunction)
        }
    return names


def exercise() -> None:
    """One call of each kernel wrapper per variant the engine uses."""
    import torch

    from cultengine import attention_metadata, kernels, ops
    from test_cascade_attention import grouped_batch, with_groups
    from test_kernels import paged_batch

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # Attention: prefill (with image spans and a window), decode with and without splits, cascade decode.
        q, k_cache, v_cache, meta = paged_batch([20, 1], [40, 30], 8, 2, 80, dtype)
        kernels.paged_attention(q, k_cache, v_cache, meta, 0.1)
        spans = attention_metadata.AttentionMetadata(
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.slot_mapping,
            meta.max_query_len,
            meta.max_seq_len,
            image_spans=torch.tensor([[22, 30]], dtype=torch.int32),
            image_span_loc=torch.tensor([0, 1, 1], dtype=torch.int32),
        )
        kernels.paged_attention(q, k_cache, v_cache, spans, 0.1, window=16)
        q, k_cache, v_cache, meta = paged_batch([1, 1], [300, 20], 8, 2, 80, dtype)
        for splits in (1, 4):
            kernels.paged_decode_attention(q, k_cache, v_cache, meta, 0.1, num_splits=splits)
        q, k_cache, v_cache, meta = grouped_batch([(2, [40, 50]), (0, [20])], 8, 2, 80, dtype)
        kernels.paged_attention(q, k_cache, v_cache, with_groups(meta, 8, 2)[0], 0.1)
        # Vision attention (fixed length, and packed variable-length segments).
        x = torch.randn(2, 20, 4, 80, generator=gen).to(dtype)
        kernels.vision_attention(x, x, x, 0.1)
        packed = torch.randn(30, 4, 80, generator=gen).to(dtype)
        kernels.varlen_vision_attention(packed, packed, packed, torch.tensor([0, 12, 30], dtype=torch.int32), 18, 0.1)
        # Cache write, norm, rotary, patch embedding.
        kv = torch.randn(5, 2, 80, generator=gen).to(dtype)
        slots = torch.tensor([1, -1, 7, 40, 3])
        kernels.write_kv(kv, kv, k_cache, v_cache, slots)
        half_caches = (k_cache.half(), v_cache.half())  # keys of another dtype than the cache's
        kernels.write_kv(kv, kv, *half_caches, slots)
        h = torch.randn(3, 96, generator=gen).to(dtype)
        weight = torch.ones(96, dtype=dtype)
        kernels.rms_norm(h, weight, 1e-6)
        kernels.rms_norm(h, weight, 1e-6, residual=h)
        cos, sin = ops.rotary_cos_sin(80, 64, 10000.0, torch.device("cpu"))
        qk = torch.randn(5, 10, 80, generator=gen).to(dtype)
        kernels.rotary_embedding(qk[:, :8], qk[:, 8:], torch.arange(5), cos, sin)
        for caches in ((k_cache, v_cache), half_caches):
            kernels.rotary_write_kv(qk[:, :8], qk[:, 8:], kv, torch.arange(5), cos, sin, *caches, slots)
        pixels = torch.randn(1, 3, 28, 28, generator=gen).to(dtype)
        conv = torch.randn(32, 3, 14, 14, generator=gen).to(dtype)
        kernels.patch_embed(pixels, conv, None, torch.randn(32).to(dtype), torch.randn(5, 32).to(dtype))
        kernels.patch_embed(pixels, conv, torch.randn(32).to(dtype), None, torch.randn(4, 32).to(dtype))


def compile_all(launches: list[dict]) -> None:
    """Compile each recorded launch for sm_90 (raises on the first the compiler rejects)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for launch in launches:
        kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        source = ASTSource(kernel, launch["signature"], constexprs=launch["constexprs"])
        try:
            compiled = triton.compile(source, target=target, options=launch["options"])
        except Exception as e:
            raise RuntimeError(f"{launch['kernel']} {launch['constexprs']} does not compile: {e}") from e
        assert compiled.asm["cubin"], launch["kernel"]


if __name__ == "__main__":
    if sys.argv[1] == "record":
        print(json.dumps({"launches": record(), "kernels": sorted(all_kernels())}))
    else:
        compile_all(json.loads(sys.stdin.read()))
