"""End-to-end generation: cultengine `Engine.generate` against transformers' batched `generate`.

    .venv/bin/python benches/bench_generate.py                      # CPU: demo checkpoint, float32
    .venv/bin/python benches/bench_generate.py --quick              # smoke run
    .venv/bin/python benches/bench_generate.py --device cuda --preset llava-1.5-7b   # GPU, bf16, random weights
    .venv/bin/python benches/bench_generate.py --overlap-ab         # ours only: overlapped scheduling on vs off

Both sides get the same requests (cultengine.profile's synthetic workload: random words, one noise
image each), the same token ids and pixel values, greedy decoding and a fixed output length: ours
with `ignore_eos`, transformers with `min_new_tokens = max_new_tokens` and no EOS (so neither stops
early and neither suppresses a token). transformers runs the checkpoint's model class
(`AutoModelForImageTextToText`: LLaVA-1.5, Qwen-VL) `generate` in batches of `--hf-batch-size` requests,
left-padded, longest prompts batched together.

Our timing covers the whole `Engine.generate` call, including chat rendering, image preprocessing
and tokenization; transformers gets its input ids and pixel values ready-made (not timed). Between
repeats our prefix cache and vision-encoder cache are emptied, so no repeat reuses an earlier one.
On the CPU (float32) we also report the fraction of requests whose greedy tokens are identical.
On CUDA (`--preset`) both models have random weights from the same config (bf16), drawn
independently, so token agreement is not checked there; fixed lengths make the work identical.

`--overlap-ab` times our engine alone, with overlapped scheduling on and off (`Engine.overlap_scheduling`:
step N+1 scheduled and launched before step N's tokens reach the host), in interleaved repeats on one
engine, and checks that both give the same tokens.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402

GOAL_CPU = 3.0


# ---------------------------------------------------------------------------------------------
# Shared setup
# ---------------------------------------------------------------------------------------------
def checkpoint_dir(preset: str | None, tmp: Path) -> Path:
    from cultengine.bench import demo_checkpoint
    from cultengine.profile import preset_checkpoint

    return preset_checkpoint(preset, tmp / preset) if preset else demo_checkpoint.ensure()


def workload_args(args, choices: int = 0) -> argparse.Namespace:
    """The namespace `cultengine.profile.build_workload` reads."""
    return argparse.Namespace(
        seed=args.seed,
        prompt_len=args.prompt_len,
        output_len=str(args.output_len),
        num_requests=args.num_requests,
        images_per_request=1,
        prompts_per_image=getattr(args, "prompts_per_image", 1),
        shared_fraction=args.shared_fraction,
        choices=choices,
    )


def scheduler_kwargs(args) -> dict:
    return dict(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=getattr(args, "prefix_caching", True),
    )


def make_engine(path: Path, args, random_init: bool, **overrides):
    from cultengine import Engine

    kw = {**scheduler_kwargs(args), **overrides}
    return Engine(
        str(path), device=args.device, dtype=args.dtype, random_init=random_init, max_model_len=args.max_model_len, **kw
    )


def reset_caches(engine, **sched_kw) -> None:
    """A fresh scheduler (empty prefix cache) and an empty vision-encoder cache; weights and the KV
    cache tensors stay. So a repeat of the same requests recomputes everything."""
    from cultengine import _core

    assert not engine.scheduler.has_unfinished()
    engine.scheduler = _core.Scheduler(
        engine.tokenizer,
        num_blocks=engine.runner.num_blocks,
        block_size=engine.runner.block_size,
        max_model_len=engine.max_model_len,
        eos_token_ids=list(engine.checkpoint.eos_token_ids),
        position_rows=engine.family.capabilities.position_rows,
        **sched_kw,
    )
    engine.runner.encoder_cache.embeddings.clear()


def prepared_inputs(engine, requests: list[dict]) -> list[tuple[list[int], list]]:
    """Our token ids (image placeholders expanded) and processed images (`ImageFeatures`, in prompt order)
    of each request, for transformers."""
    out = []
    for p in engine.prepare(requests):
        if isinstance(p, Exception):
            raise p
        out.append((p.prompt_ids, [f for _, f in p.image_starts]))
    return out


def image_kwargs(model, ids: torch.Tensor, images: list[list], device) -> dict:
    """transformers' image arguments for a batch whose row i shows `images[i]`: one tile per image stacked
    (LLaVA-1.5), or Qwen-VL's packed patches with their grids and which tokens are image tokens (its M-RoPE
    positions come from them)."""
    feats = [f for row in images for f in row]
    if feats and hasattr(feats[0].meta, "thw"):  # Qwen's QwenGrid
        return {
            "pixel_values": torch.cat([f.pixels for f in feats]).to(device=device, dtype=model.dtype),
            "image_grid_thw": torch.tensor([f.meta.thw for f in feats], device=device),
            "mm_token_type_ids": (ids == model.config.image_token_id).int(),
        }
    return {"pixel_values": torch.stack([f.pixels for f in feats]).to(device=device, dtype=model.dtype)}


def hf_model(path: Path, device: str, dtype: torch.dtype, random_init: bool):
    import transformers

    auto = transformers.AutoModelForImageTextToText
    if random_init:
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device(device):
            model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(path, dtype=dtype).to(device)
    return model.eval()


def pad_token_id(engine) -> int:
    """The tokenizer's pad token (any id works under the attention mask, bar the image placeholder)."""
    pad = engine.checkpoint.tokenizer_config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = engine.tokenizer.token_to_id(pad) if isinstance(pad, str) else None
    return pad_id if pad_id is not None else int(engine.family.placeholder_id == 0)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Request indices, longest first, in batches: the least padding transformers can have."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def overlap_ab(engine, requests, output_lens: list[int], args, model_name: str) -> None:
    """Ours with overlapped scheduling on and off: interleaved repeats, the same engine, the same tokens."""
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    run_ours(engine, requests[:4], [2] * 4, args)  # warm-up
    for _ in range(args.repeats):
        for on in (True, False):
            engine.overlap_scheduling = on
            t, tokens[on] = bench_common.timed(lambda: run_ours(engine, requests, output_lens, args), args.device)
            times[on].append(t)
            print(f"overlap {'on' if on else 'off'}: {t:.2f} s", flush=True)
    engine.overlap_scheduling = True
    out_tokens = sum(output_lens)
    rows = [
        {
            "overlap_scheduling": on,
            "seconds": bench_common.median(times[on]),
            "best_s": min(times[on]),
            "out_tok_s": out_tokens / bench_common.median(times[on]),
            "repeats_s": times[on],
        }
        for on in (True, False)
    ]
    speedup = rows[0]["out_tok_s"] / rows[1]["out_tok_s"]
    env = bench_common.environment(args.device)
    lines = [
        f"# Overlapped scheduling on vs off ({env['device']})",
        f"Model: {model_name}, {args.dtype}. `Engine.generate` of {args.num_requests} requests (workload "
        f"`{args.workload}`, one image each, output lengths {args.output_len} tokens, {out_tokens} in all, greedy), "
        f"max_num_seqs {args.max_num_seqs}; median of {args.repeats} interleaved repeat(s) on one engine.",
        bench_common.table(
            rows,
            ["overlap_scheduling", "seconds", "best_s", "out_tok_s"],
            ["overlap_scheduling", "median wall s", "best wall s", "output tok/s (median)"],
        ),
        f"Speed-up with overlap on: {speedup:.3f}x. Tokens identical on and off: "
        f"{'yes' if tokens[True] == tokens[False] else 'NO'}.",
    ]
    if torch.device(args.device).type == "cpu":
        lines.append(
            "On the CPU torch runs each op as it is issued, so the host cannot run ahead of the device and "
            "no gain is expected: overlap hides host work (scheduling, plan upload, `update`) behind a GPU's."
        )
    data = {
        "bench": "generate-overlap",
        "env": env,
        "model": model_name,
        "quick": args.quick,
        "rows": rows,
        "speedup": speedup,
        "tokens_identical": tokens[True] == tokens[False],
        "workload": {
            "num_requests": args.num_requests,
            "output_len": args.output_len,
            "workload": args.workload,
            "prompt_len_words": args.prompt_len,
            "max_num_seqs": args.max_num_seqs,
            "seed": args.seed,
        },
    }
    bench_common.write_results("generate-overlap", args.device, "\n\n".join(lines), data, args.out)


# ---------------------------------------------------------------------------------------------
# The two systems
# ---------------------------------------------------------------------------------------------
def run_ours(engine, requests, output_lens: list[int], args) -> list[list[int]]:
    from cultengine import SamplingParams

    reset_caches(engine, **scheduler_kwargs(args))
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
    outs = engine.generate(requests, params, use_tqdm=False)
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return [o.token_ids for o in outs]


@torch.inference_mode()
def run_hf(model, inputs, output_lens: list[int], batch_size: int, pad_id: int, device) -> list[list[int]]:
    """Batched `generate`; a batch runs until its longest answer is done and each answer is cut to its
    own length (what EOS at different steps does to a static batch)."""
    from transformers import GenerationConfig

    results: list[list[int] | None] = [None] * len(inputs)
    for idx in batches_by_length([len(ids) for ids, _ in inputs], batch_size):
        steps = max(output_lens[i] for i in idx)
        # No EOS at all: greedy for exactly `steps` tokens, as ignore_eos does on our side.
        gen = GenerationConfig(
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=None,
            bos_token_id=None,
        )
        ids, mask = left_pad([inputs[i][0] for i in idx], pad_id, device)
        images = image_kwargs(model, ids, [inputs[i][1] for i in idx], device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **images)
        new = out[:, ids.shape[1] :].tolist()
        for i, toks in zip(idx, new, strict=True):
            results[i] = toks[: output_lens[i]]
    return results


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    same = [a == b for a, b in zip(ours, theirs, strict=True)]

    def prefix(a, b):
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n / max(len(a), 1)

    return {
        "identical_fraction": float(np.mean(same)),
        "mean_common_prefix_fraction": float(np.mean([prefix(a, b) for a, b in zip(ours, theirs, strict=True)])),
        "lengths_ok": all(len(a) == len(b) for a, b in zip(ours, theirs, strict=True)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--preset",
        default=None,
        help="shape preset with random weights (cultengine profile --list-presets); default: the demo checkpoint",
    )
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--num-requests", type=int, default=None, help="default: 64 on the CPU, 1000 on CUDA")
    parser.add_argument(
        "--prompt-len",
        default=None,
        help="words per prompt (profile syntax: N, LO:HI, exp:MEAN); default 16 on the CPU (~32 tokens), 16:64 on CUDA",
    )
    parser.add_argument(
        "--output-len", default=None, help="tokens per output (N, LO:HI, exp:MEAN); default 32 CPU, 64 CUDA"
    )
    parser.add_argument(
        "--shared-fraction", type=float, default=0.0, help="fraction of requests sharing one image and a prompt prefix"
    )
    parser.add_argument(
        "--prompts-per-image", type=int, default=1, help="consecutive requests asking about the same image"
    )
    parser.add_argument(
        "--workload",
        choices=("uniform", "benchmark", "stories"),
        default="uniform",
        help="uniform: fixed output length, one image per request (the defaults); benchmark: "
        "4 questions per image and answers of 4 to 64 tokens, as on cultural benchmarks; "
        "stories: one image x 42 nationalities x 2 temperatures (84 prompts), 200-token stories",
    )
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument(
        "--overlap-ab", action="store_true", help="ours only, overlapped scheduling on vs off (no transformers run)"
    )
    bench_common.add_run_args(parser, "requests of 4 tokens")
    args = parser.parse_args(argv)
    cuda = bench_common.setup_run(args, "bench_generate")
    if args.workload == "stories":  # 42 nationalities x 2 temperatures about one image
        args.num_requests = args.num_requests or 84
        args.prompts_per_image, args.output_len = args.num_requests, args.output_len or "200"
    args.num_requests = args.num_requests or (1000 if cuda else 64)
    args.prompt_len = args.prompt_len or ("16:64" if cuda else "16")
    if args.workload == "benchmark":
        args.prompts_per_image, args.output_len = 4, args.output_len or "4:64"

    args.output_len = str(args.output_len or (64 if cuda else 32))
    if args.quick:
        args.num_requests, args.output_len, args.repeats = 8, "4", 1
    dtype = getattr(torch, args.dtype)

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        path = checkpoint_dir(args.preset, tmp)
        random_init = args.preset is not None
        engine = make_engine(path, args, random_init)
        from cultengine.profile import build_workload

        requests, output_lens = build_workload(engine, workload_args(args))
        if args.overlap_ab:
            overlap_ab(engine, requests, output_lens, args, args.preset or "demo checkpoint")
            return
        inputs = prepared_inputs(engine, requests)
        kv_bytes_per_key = engine.runner.kv_bytes_per_key
        pad_id = pad_token_id(engine)
        prompt_tokens = [len(ids) for ids, _ in inputs]
        out_tokens = sum(output_lens)

        def ours_warmup():
            run_ours(engine, requests[:4], [2] * 4, args)

        from cultengine.attention_metadata import cascade_tile_width

        runner = engine.runner
        default_width = runner.cascade_width  # the engine's default: cascade on the Triton backend only
        on_width = cascade_tile_width(engine.model.num_heads // engine.model.num_kv_heads)

        def ours_run(cascade: bool):
            runner.cascade_width = on_width if cascade else 0  # shared-prefix decode on, or every sequence alone
            read_before = runner.decode_keys_read
            try:
                out = run_ours(engine, requests, output_lens, args)
            finally:
                runner.cascade_width = default_width
            prefill["shared"] = engine.stats()["prefill_tokens_computed"]  # counted from the reset
            decode_keys[cascade] = runner.decode_keys_read - read_before
            return out

        prefill: dict[str, int] = {}
        decode_keys: dict[bool, int] = {}
        systems = [(f"cultengine, {'' if on else 'no '}cascade", lambda on=on: ours_run(on)) for on in (True, False)]
        default_system = systems[0 if default_width else 1][0]

        hf = None

        def hf_setup():
            nonlocal hf
            hf = hf_model(path, args.device, dtype, random_init)
            run_hf(hf, inputs[:2], [2, 2], 2, pad_id, args.device)  # warm-up

        def hf_run():
            return run_hf(hf, inputs, output_lens, args.hf_batch_size, pad_id, args.device)

        times = {name: [] for name in (*dict(systems), "transformers")}
        # The prefill work that sharing saves: the same requests once with the prefix cache off.
        kw = {**scheduler_kwargs(args), "enable_prefix_caching": False}
        reset_caches(engine, **kw)
        from cultengine import SamplingParams

        engine.generate(requests, [SamplingParams(max_tokens=1) for _ in requests], use_tqdm=False)
        prefill["no_sharing"] = engine.stats()["prefill_tokens_computed"]
        tokens = {}
        if cuda:  # one model on the device at a time: ours (with its KV cache) first, then transformers
            ours_warmup()
            for _ in range(args.repeats):
                for name, fn in systems:
                    t, tokens[name] = bench_common.timed(fn, args.device)
                    times[name].append(t)
                    print(f"{name}: {t:.2f} s", flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            hf_setup()
            for _ in range(args.repeats):
                t, tokens["transformers"] = bench_common.timed(hf_run, args.device)
                times["transformers"].append(t)
                print(f"transformers: {t:.2f} s", flush=True)
        else:  # interleaved repeats, so a busy neighbour slows both sides alike
            ours_warmup()
            hf_setup()
            for _ in range(args.repeats):
                for name, fn in (*systems, ("transformers", hf_run)):
                    t, tokens[name] = bench_common.timed(fn, args.device)
                    times[name].append(t)
                    print(f"{name}: {t:.2f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name in times:
        wall = bench_common.median(times[name])
        rows.append(
            {
                "system": name,
                "seconds": wall,
                "out_tok_s": out_tokens / wall,
                "req_s": args.num_requests / wall,
                "repeats_s": times[name],
            }
        )
    for r in rows:
        r["ratio"] = r["out_tok_s"] / rows[-1]["out_tok_s"]
    ratio = next(r["ratio"] for r in rows if r["system"] == default_system)
    check = agreement(tokens[default_system], tokens["transformers"]) if not random_init else None
    env = bench_common.environment(args.device)
    model_name = args.preset or "demo checkpoint (cultengine.bench.demo_checkpoint)"
    workload = {
        "num_requests": args.num_requests,
        "images_per_request": 1,
        "prompt_len_words": args.prompt_len,
        "prompt_tokens_mean": float(np.mean(prompt_tokens)),
        "prompt_tokens_max": max(prompt_tokens),
        "output_len": args.output_len,
        "output_tokens": out_tokens,
        "workload": args.workload,
        "prompts_per_image": args.prompts_per_image,
        "shared_fraction": args.shared_fraction,
        "hf_batch_size": args.hf_batch_size,
        "max_num_seqs": args.max_num_seqs,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    lines = [
        f"# End-to-end generation: cultengine vs transformers ({env['device']})",
        f"Model: {model_name}, {args.dtype}{', random weights' if random_init else ''}. "
        f"Workload `{args.workload}`: {args.num_requests} requests, one image each ({args.prompts_per_image} "
        f"request(s) per image), prompts of {np.mean(prompt_tokens):.0f} tokens on average "
        f"(max {max(prompt_tokens)}, image tokens included), output lengths {args.output_len} tokens "
        f"({out_tokens} in all, greedy; transformers runs each batch to its longest answer). "
        f"transformers: `generate` in batches of {args.hf_batch_size}, left-padded. Median of {args.repeats} "
        f"repeat(s); ours includes request preprocessing, transformers' inputs are ready-made.",
    ]
    if not cuda:
        lines.append(
            f"**Goal on the CPU: >= {GOAL_CPU:.0f}x transformers' output tokens/s "
            f"({'met' if ratio >= GOAL_CPU else 'NOT met'}: {ratio:.2f}x).**"
        )
    lines.append(
        f"`{default_system}` is the engine's default on this backend (shared-prefix decode attention is on "
        f"by default with the Triton kernels, off with the torch reference)."
    )
    lines.append(
        bench_common.table(
            rows,
            ["system", "seconds", "out_tok_s", "req_s", "ratio"],
            ["system", "wall s", "output tok/s", "requests/s", "ratio vs transformers"],
        )
    )
    lines.append(
        f"Prefill tokens computed: {prefill['shared']} with prefix sharing, {prefill['no_sharing']} "
        f"without ({prefill['no_sharing'] / max(prefill['shared'], 1):.2f}x)."
    )
    workload["prefill_tokens"] = prefill
    # Decode attention's KV traffic (full-attention layers), per generated token.
    per_token = {k: decode_keys[k] * kv_bytes_per_key / out_tokens for k in (True, False)}
    lines.append(
        f"Decode KV bytes read per generated token: {per_token[True] / 2**20:.2f} MiB with shared-prefix "
        f"(cascade) attention, {per_token[False] / 2**20:.2f} MiB without "
        f"({per_token[False] / max(per_token[True], 1):.2f}x less)."
    )
    workload["decode_kv_bytes_per_token"] = {"cascade": per_token[True], "no_cascade": per_token[False]}
    same = tokens["cultengine, cascade"] == tokens["cultengine, no cascade"]
    lines.append(f"Outputs with and without cascade: {'identical' if same else 'DIFFERENT'}.")
    workload["cascade_outputs_identical"] = same
    if check:
        lines.append(
            f"Greedy agreement (float32): {100 * check['identical_fraction']:.1f} % of requests have "
            f"identical token sequences; mean common prefix {100 * check['mean_common_prefix_fraction']:.1f}"
            f" % of the output."
        )
    data = {
        "bench": "generate",
        "env": env,
        "model": model_name,
        "random_weights": random_init,
        "quick": args.quick,
        "workload": workload,
        "rows": rows,
        "ratio": ratio,
        "goal_cpu": GOAL_CPU,
        "agreement": check,
    }
    name = "generate" if args.workload == "uniform" else f"generate-{args.workload}"
    bench_common.write_results(name, args.device, "\n\n".join(lines), data, args.out)


if __name__ == "__main__":
    main()
