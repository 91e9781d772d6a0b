"""`cultengine profile`: throughput, latency and where the time goes, on a synthetic workload.

`--model` takes a checkpoint directory, `demo`, or a shape preset (`--list-presets`; each family declares its
own, `cultengine.presets`) whose weights are drawn at load time, so real model sizes can be profiled without
downloading anything; their shapes come from the models' published config files where the package ships them
(`published/`). Presets have billions of parameters and need CUDA: on a CPU they are refused
unless `--allow-cpu`. `--dry-run` runs nothing: it plans memory (weight and KV-cache bytes) from the shapes,
on any machine.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .console import add_quiet, add_tensor_parallel, add_threads, positive_int
from .presets import PUBLISHED, PresetTokens, Published, merged, published

# numpy, torch, PIL and the model families are imported where they are used, so that `cultengine --help` loads
# none of them.


def preset_names() -> list[str]:
    """Every family's shape presets (they live in the family files: importing them loads torch)."""
    from .models import presets

    return list(presets())


def preset_checkpoint(name: str, out_dir: Path) -> Path:
    """A checkpoint directory with the preset's config and the demo tokenizer, no weight files."""
    from .bench import demo_checkpoint
    from .models import presets

    demo = demo_checkpoint.ensure()
    spec = presets()[name]
    # The demo's tokenizer and template; its model files only where the preset has none of its own.
    model_files = {"config.json", "model.safetensors.index.json"}
    if isinstance(spec, Published):
        model_files |= {"preprocessor_config.json", "processor_config.json"}
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in demo.iterdir():
        if f.suffix != ".safetensors" and f.name not in model_files:
            shutil.copy(f, out_dir / f.name)
    demo_cfg = json.loads((demo / "config.json").read_text())
    if isinstance(spec, Published):
        for f in (PUBLISHED / spec.folder).iterdir():
            shutil.copy(f, out_dir / f.name)
        config = merged(published(spec.folder), spec.changes)
    else:
        config = {**demo_cfg, **spec.config, "text_config": {**spec.config["text_config"]}}
        (out_dir / "preprocessor_config.json").write_text(json.dumps(spec.preprocessor))
    config["dtype"] = "bfloat16"
    # The demo tokenizer's ids (its image token included) must stay inside the preset's vocabulary.
    demo_vocab = demo_cfg["text_config"]["vocab_size"]
    text = config.get("text_config", config)  # transformers 4's Qwen2.5-VL layout: the text fields on top
    if "vocab_size" in text:
        text["vocab_size"] = max(text["vocab_size"], demo_vocab + 2)
    config["image_token_index"] = config["image_token_id"] = demo_cfg["image_token_index"]  # both names in use
    if spec.tokens is not None:
        config["image_token_id"] = _add_family_tokens(out_dir, spec.tokens)
    if "mm_tokens_per_image" in config:  # Gemma 3: the demo's <image> opens an image; soft/end ids past its vocab
        config.update(
            boi_token_index=demo_cfg["image_token_index"],
            image_token_index=demo_vocab,
            image_token_id=demo_vocab,
            eoi_token_index=demo_vocab + 1,
        )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _add_family_tokens(out_dir: Path, tokens: PresetTokens) -> int:
    """Add a family's marker tokens to the copied demo tokenizer, make its chat template write the family's
    placeholder, write processor_config.json; returns the placeholder's id."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tokens.special])
    tok.save(str(out_dir / "tokenizer.json"))
    tc = json.loads((out_dir / "tokenizer_config.json").read_text())
    tc["chat_template"] = tc["chat_template"].replace("<image>", tokens.image_token)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out_dir / "processor_config.json").write_text(json.dumps(tokens.processor))
    return tok.token_to_id(tokens.image_token)


def _lengths(spec: str, n: int, rng: random.Random) -> list[int]:
    """`64` (fixed), `32:128` (uniform), or `exp:64` (exponential with that mean, at least 1)."""
    if spec.startswith("exp:"):
        mean = float(spec[4:])
        return [max(1, int(rng.expovariate(1 / mean))) for _ in range(n)]
    if ":" in spec:
        lo, hi = (int(x) for x in spec.split(":"))
        return [rng.randint(lo, hi) for _ in range(n)]
    return [int(spec)] * n


def _length_spec(text: str) -> str:
    """argparse type: a `_lengths` spec, checked before anything loads."""
    try:
        lengths = _lengths(text, 2, random.Random(0))
        ok = min(lengths) >= 1 and (not text.startswith("exp:") or float(text[4:]) > 0)
    except (ValueError, ZeroDivisionError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected N, LO:HI or exp:MEAN (positive numbers), got {text!r}")
    return text


def build_workload(engine, args) -> tuple[list[dict], list[int]]:
    """Synthetic requests: random words and noise images; a fraction share one image and prefix."""
    import numpy as np
    from PIL import Image

    rng = random.Random(args.seed)
    vocab = [engine.tokenizer.id_to_token(i) for i in range(min(engine.tokenizer.vocab_size, 4000))]
    words = [w.strip("Ġ▁ ") for w in vocab if w and w.strip("Ġ▁ ").isalpha()] or ["word"]
    size = engine.family.dummy_image().width
    prompt_lens = _lengths(args.prompt_len, args.num_requests, rng)
    output_lens = _lengths(args.output_len, args.num_requests, rng)

    def image(seed: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    shared_images = [image(10_000 + i) for i in range(args.images_per_request)]
    shared_prefix = text(max(prompt_lens) // 2)
    per_image = getattr(args, "prompts_per_image", 1)
    requests = []
    for i in range(args.num_requests):
        shared = rng.random() < args.shared_fraction
        # Runs of `per_image` requests ask about the same image(s), as benchmarks ask several
        # questions per picture.
        group = i // per_image
        imgs = shared_images if shared else [image(group * 31 + k) for k in range(args.images_per_request)]
        body = (shared_prefix + " " if shared else "") + text(prompt_lens[i])
        content = [{"type": "image", "image": im} for im in imgs] + [{"type": "text", "text": body}]
        req = {"messages": [{"role": "user", "content": content}]}
        if args.choices:
            req["choices"] = [" " + text(rng.randint(1, 4)) for _ in range(args.choices)]
        requests.append(req)
    return requests, output_lens


def _percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    arr = np.array(values) * 1000
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}


def memory_plan(
    model: str, dtype: str, max_model_len: int | None, gpu_memory_gib: float, tensor_parallel_size: int = 1
) -> dict:
    """Weight and KV-cache bytes of a checkpoint or preset, from its shapes alone (the model is built on the
    meta device: nothing is allocated or read), and whether one GPU of `gpu_memory_gib` holds them; with
    tensor parallelism, one rank's share (its shards, the replicated weights, its KV heads) on each GPU."""
    import torch

    from .checkpoint import load_checkpoint
    from .models import family_for
    from .shards import TensorParallel

    ckpt = load_checkpoint(model, dtype=dtype, device="meta", random_init=True)
    family = family_for(ckpt)
    if tensor_parallel_size > 1:
        ckpt.tensor_parallel = TensorParallel(0, tensor_parallel_size)  # rank 0's shard: as large as any
    weights = []
    draw = ckpt.tensor
    ckpt.tensor = lambda name, shape=None, part=None: weights.append(draw(name, shape, part)) or weights[-1]
    built = family.build_model(None, max_positions=1)
    elem = torch.tensor([], dtype=ckpt.dtype).element_size()
    context = min(max_model_len or family.max_context, family.max_context)
    kv_per_token = 2 * built.num_layers * built.num_kv_heads * built.head_dim * elem
    weight_bytes = sum(w.numel() for w in weights) * elem
    need = weight_bytes + kv_per_token * context
    return {
        "model": model,
        "architecture": ckpt.architecture,
        "dtype": str(ckpt.dtype).removeprefix("torch."),
        "weight_gib": weight_bytes / 2**30,
        "kv_bytes_per_token": kv_per_token,
        "max_model_len": context,
        "kv_gib_per_full_sequence": kv_per_token * context / 2**30,
        "gpu_memory_gib": gpu_memory_gib,
        "tensor_parallel_size": tensor_parallel_size,
        "fits_one_gpu": need <= gpu_memory_gib * 2**30,
        "full_sequences_per_gpu": max(0, int((gpu_memory_gib * 2**30 - weight_bytes) // (kv_per_token * context))),
    }


def format_memory_plan(p: dict) -> str:
    tp = p.get("tensor_parallel_size", 1)
    gpus = "one GPU" if tp == 1 else f"each of {tp} GPUs"
    verdict = (
        f"fits {gpus}"
        if p["fits_one_gpu"]
        else f"does NOT fit {gpus}: it needs (more) tensor parallelism (or a smaller dtype / max_model_len)"
    )
    per_rank = "" if tp == 1 else f" (one rank's share of {tp})"
    gpu_label = ("one " if tp == 1 else f"{tp} x ") + f"{p['gpu_memory_gib']:.0f} GiB GPU"
    return "\n".join(
        [
            f"cultengine profile --dry-run: {p['model']} ({p['architecture']}, {p['dtype']})",
            f"  weights                 {p['weight_gib']:.2f} GiB{per_rank}",
            f"  KV cache                {p['kv_bytes_per_token'] / 2**10:.0f} KiB per token, "
            f"{p['kv_gib_per_full_sequence']:.2f} GiB per {p['max_model_len']}-token sequence{per_rank}",
            f"  {gpu_label:<22}  {verdict}; {p['full_sequences_per_gpu']} full-length sequences beside the weights",
        ]
    )


def _device(args) -> str:
    """--device, else cuda when there is one; a shape preset on a CPU is refused (it would draw many GiB of
    weights and run for a very long time) unless --allow-cpu."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] == "cpu" and args.model in preset_names() and not getattr(args, "allow_cpu", False):
        raise ValueError(
            f"profile --model {args.model}: a preset of a real model's shapes (billions of parameters) "
            "needs CUDA; on a CPU it takes many GiB and a very long time. Use --dry-run to plan its "
            "memory, --model demo (or a small checkpoint) on a CPU, or --allow-cpu to run it anyway"
        )
    return device


def run_profile(args) -> dict:
    import torch

    from . import Engine, SamplingParams
    from .bench import demo_checkpoint

    device = _device(args)
    show_bar = not getattr(args, "quiet", False) and sys.stderr.isatty()

    tmp = None
    model = args.model
    if model in preset_names():
        tmp = Path(tempfile.mkdtemp(prefix="cultengine-preset-"))
        model = str(preset_checkpoint(model, tmp))
    else:
        model = str(demo_checkpoint.resolve(model))
    engine = None
    try:
        engine = Engine(
            model,
            device=device,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            threads=getattr(args, "threads", None),
            max_num_batched_tokens=args.max_num_batched_tokens,
            attention_backend=args.backend,
            random_init=tmp is not None,
            profile=True,
            cuda_graphs=not args.no_cuda_graphs,
            tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        )
        requests, output_lens = build_workload(engine, args)
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        before = engine.stats()
        start = time.perf_counter()
        if args.choices:
            outs = engine.score(requests, use_tqdm=show_bar)
        else:
            params = [
                SamplingParams(max_tokens=n, temperature=args.temperature, seed=i, ignore_eos=True)
                for i, n in enumerate(output_lens)
            ]
            outs = engine.generate(requests, params, use_tqdm=show_bar)
        wall = time.perf_counter() - start
        after = engine.stats()
    finally:
        if engine is not None:
            engine.close()  # its tensor-parallel workers; what the report reads stays on rank 0
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float) and k in before}
    images = args.num_requests * args.images_per_request
    out_tokens = delta["generated_tokens"]
    timings = engine.clock.latencies
    report = {
        "model": args.model,
        "device": str(engine.device),
        "dtype": str(engine.checkpoint.dtype).replace("torch.", ""),
        "backend": engine.ops.backend,
        "cuda_graphs": engine.runner.decode_graphs is not None,
        "workload": {
            k: getattr(args, k)
            for k in (
                "num_requests",
                "images_per_request",
                "prompts_per_image",
                "prompt_len",
                "output_len",
                "shared_fraction",
                "choices",
            )
        },
        "wall_seconds": wall,
        "requests_per_s": args.num_requests / wall,
        "input_tokens_per_s": delta["prompt_tokens"] / wall,
        "prefill_tokens_per_s": delta["prefill_tokens_computed"] / wall,
        "output_tokens_per_s": out_tokens / wall,
        "images_per_s": images / wall,
        "ttft_ms": _percentiles(timings["ttft"]),
        "tpot_ms": _percentiles(timings["tpot"]),
        "kv_cache_peak_use": after["peak_used_blocks"] / after["num_blocks"],
        "prefix_cache_hit_rate": delta["prefix_cache_hit_tokens"] / max(delta["prefix_cache_queried_tokens"], 1),
        "images_encoded": delta["images_encoded"],
        "time_breakdown_s": {k: round(v, 4) for k, v in engine.clock.phase_seconds.items()},
        "scheduler_us_per_step": delta["schedule_ns"] / max(delta["steps"], 1) / 1000,
        "steps": delta["steps"],
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(engine.device)
            if engine.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**30,
    }
    return report


def format_report(r: dict) -> str:
    lines = [
        f"cultengine profile: {r['model']} on {r['device']} ({r['dtype']}, {r['backend']} backend"
        f"{', CUDA graphs' if r['cuda_graphs'] else ''})",
        f"workload: {r['workload']}",
        "",
    ]
    rows = [
        ("wall time", f"{r['wall_seconds']:.2f} s"),
        ("requests/s", f"{r['requests_per_s']:.2f}"),
        ("input tokens/s", f"{r['input_tokens_per_s']:.1f}"),
        ("prefill tokens/s (computed)", f"{r['prefill_tokens_per_s']:.1f}"),
        ("output tokens/s", f"{r['output_tokens_per_s']:.1f}"),
        ("images/s", f"{r['images_per_s']:.2f}"),
    ]
    for name in ("ttft_ms", "tpot_ms"):
        if r[name]:
            rows.append((name.replace("_ms", " (ms) p50/p90/p99"), " / ".join(f"{v:.1f}" for v in r[name].values())))
    rows += [
        ("KV cache peak use", f"{100 * r['kv_cache_peak_use']:.1f} %"),
        ("prefix-cache hit rate", f"{100 * r['prefix_cache_hit_rate']:.1f} %"),
        ("images encoded", str(r["images_encoded"])),
        ("scheduler CPU per step", f"{r['scheduler_us_per_step']:.1f} us over {r['steps']} steps"),
        ("peak memory", f"{r['peak_memory_gib']:.2f} GiB"),
    ]
    total = sum(r["time_breakdown_s"].values()) or 1.0
    rows += [(f"time: {k}", f"{v:.3f} s ({100 * v / total:.0f} %)") for k, v in r["time_breakdown_s"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(lines + [f"  {k:<{width}}  {v}" for k, v in rows])


def register(sub) -> None:
    p = sub.add_parser(
        "profile", help="throughput, latency and time breakdown on a synthetic workload", description=__doc__
    )
    p.add_argument(
        "--model",
        default="demo",
        help="checkpoint directory, 'demo', or a shape preset with random weights (--list-presets names them)",
    )
    p.add_argument("--list-presets", action="store_true", help="list the shape presets and exit")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--allow-cpu", action="store_true", help="run a shape preset (billions of parameters) on a CPU")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--backend", default=None, help="torch | triton | flash (default: triton on CUDA, torch on CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (CUDA)")
    p.add_argument("--num-requests", type=positive_int, default=64, help="requests in the workload")
    p.add_argument("--images-per-request", type=int, default=1, help="noise images in each request")
    p.add_argument(
        "--prompt-len", type=_length_spec, default="32", help="words per prompt: N, LO:HI (uniform) or exp:MEAN"
    )
    p.add_argument("--output-len", type=_length_spec, default="32", help="tokens per output: N, LO:HI or exp:MEAN")
    p.add_argument(
        "--prompts-per-image",
        type=positive_int,
        default=1,
        help="consecutive requests asking about the same image(s), as benchmarks do",
    )
    p.add_argument(
        "--shared-fraction",
        type=float,
        default=0.5,
        help="fraction of requests sharing one image and a prompt prefix (prefix cache, encoder cache)",
    )
    p.add_argument("--choices", type=int, default=0, help="score this many choices per request instead of generating")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences the engine runs at once")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=8192, help="tokens per engine step")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    add_threads(p)
    add_tensor_parallel(p)
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan memory from the shapes only (weights, KV cache per token and per sequence)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context the --dry-run plan sizes the KV cache for")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="one GPU's memory, for --dry-run")
    p.set_defaults(func=_main)


def format_presets() -> str:
    """One line per shape preset: its name, architecture and where its files come from."""
    from .models import presets

    lines = []
    for name, spec in presets().items():
        if isinstance(spec, Published):
            arch = published(spec.folder)["architectures"][0]
            source = f"published/{spec.folder}" + (" with larger sizes" if spec.changes else "")
        else:
            arch, source = spec.config["architectures"][0], "composed of published and typed parts"
        lines.append(f"{name:<20} {arch:<44} {source}")
    return "\n".join(lines)


def _main(args) -> int:
    if args.list_presets:
        print(format_presets())
        return 0
    if args.dry_run:
        tmp = Path(tempfile.mkdtemp(prefix="cultengine-preset-")) if args.model in preset_names() else None
        try:
            model = str(preset_checkpoint(args.model, tmp) if tmp else args.model)
            plan = memory_plan(
                model,
                "bfloat16" if args.dtype == "auto" and tmp else args.dtype,
                args.max_model_len,
                args.gpu_memory_gib,
                args.tensor_parallel_size,
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        print(
            json.dumps({**plan, "model": args.model}, indent=2)
            if args.json
            else format_memory_plan({**plan, "model": args.model})
        )
        return 0
    report = run_profile(args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    sys.stdout.flush()
    return 0
