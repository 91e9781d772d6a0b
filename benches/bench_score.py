"""4-choice multiple-choice scoring: cultengine `Engine.score` against vLLM-style and lm-eval-style scoring.

    .venv/bin/python benches/bench_score.py               # CPU: demo checkpoint, float32, 64 questions
    .venv/bin/python benches/bench_score.py --quick       # smoke run
    .venv/bin/python benches/bench_score.py --device cuda --preset llava-1.5-7b   # GPU, bf16, random weights

Each question is one image + one question (cultengine.profile's synthetic workload, a distinct noise
image per question) and 4 choices of 1-4 words. Three ways to get the 4 log-likelihoods:

  (a) cultengine `Engine.score`: the context is computed once, its last row scores every choice's first
      token, and each choice forks over the context's KV blocks (the partial last block copied on
      write), computing only its own tokens;
  (p) the previous way, each choice its own sequence sharing the context's full KV blocks through the
      prefix cache (the context's partial last block recomputed per choice);
  (b) each choice its own sequence, prefix caching off: every choice recomputes its whole context (what
      vLLM does when asked for prompt logprobs, which turns the prefix cache off);
  (c) lm-evaluation-harness style with transformers: per question one right-padded forward over its
      4 (context + choice) sequences, the image's pixel values repeated 4 times, summing the
      log-probabilities of the choice tokens.

All three get the same token ids (context with image placeholders expanded, each choice tokenized on
its own and appended) and the same pixel values. Our timing covers the whole `Engine.score` call,
including preprocessing; transformers gets its inputs ready-made. Between repeats our prefix and
vision-encoder caches are emptied. In float32 (CPU) the three must pick the same choice and agree on
every log-likelihood within 1e-3; with `--preset` (random weights drawn independently for
transformers) only (a) and (b) are compared.
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
import bench_generate as common  # noqa: E402

GOAL_VS_LM_EVAL = 3.0
ATOL = 1e-3


def ideal_prefill_tokens(questions) -> int:
    """Each context once, and each choice's tokens but its last."""
    return sum(len(ctx) + sum(len(c) - 1 for c in choices) for ctx, choices, _ in questions)


def run_ours(engine, requests, args, prefix_caching: bool, per_choice: bool = False) -> np.ndarray:
    """Log-likelihoods `[questions, choices]`; `per_choice` scores each choice as a request of its own."""
    common.reset_caches(engine, **{**common.scheduler_kwargs(args), "enable_prefix_caching": prefix_caching})
    asked = [{**r, "choices": [c]} for r in requests for c in r["choices"]] if per_choice else requests
    before = engine.stats()["prefill_tokens_computed"]
    outs = engine.score(asked, use_tqdm=False)
    PREFILL_TOKENS[(prefix_caching, per_choice)] = engine.stats()["prefill_tokens_computed"] - before
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    lps = [c.logprob for o in outs for c in o.choices]
    return np.array(lps, dtype=np.float64).reshape(len(requests), -1)


PREFILL_TOKENS: dict[tuple[bool, bool], int] = {}  # (prefix caching, per choice) -> tokens computed, last run


@torch.inference_mode()
def run_lm_eval_style(model, questions, pad_id: int, device) -> np.ndarray:
    """`questions`: (context ids, choice ids list, the context's images) each; one forward per question."""
    results = []
    for ctx, choices, images in questions:
        seqs = [ctx + c for c in choices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding, as lm-eval does for log-likelihoods
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(
            input_ids=ids, attention_mask=mask, **common.image_kwargs(model, ids, [images] * len(seqs), device)
        ).logits
        row = []
        for i, c in enumerate(choices):
            lp = torch.log_softmax(logits[i, len(ctx) - 1 : len(ctx) - 1 + len(c)].float(), dim=-1)
            row.append(float(lp.gather(1, torch.tensor(c, device=device)[:, None]).sum()))
        results.append(row)
    return np.array(results, dtype=np.float64)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--preset", default=None, help="shape preset with random weights (cultengine profile --list-presets)"
    )
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--num-questions", type=int, default=None, help="default: 64 on the CPU, 500 on CUDA")
    parser.add_argument("--prompt-len", default="16", help="words per question (profile syntax)")
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--name", default="score", help="results file name: benches/results/<name>-<device>.md")
    parser.add_argument("--block-size", type=int, default=16, help="our KV block size (prefix sharing granularity)")
    bench_common.add_run_args(parser, "questions")
    args = parser.parse_args(argv)
    cuda = bench_common.setup_run(args, "bench_score")
    args.num_questions = args.num_questions or (500 if cuda else 64)
    if args.quick:
        args.num_questions, args.repeats = 8, 1
    args.num_requests, args.shared_fraction, args.output_len = args.num_questions, 0.0, 1
    dtype = getattr(torch, args.dtype)

    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        path = common.checkpoint_dir(args.preset, tmp)
        random_init = args.preset is not None
        engine = common.make_engine(path, args, random_init, block_size=args.block_size)
        from cultengine.profile import build_workload

        requests, _ = build_workload(engine, common.workload_args(args, choices=args.choices))
        contexts = common.prepared_inputs(engine, requests)
        questions = []
        for (ctx, images), req in zip(contexts, requests, strict=True):
            choice_ids = engine.tokenizer.encode_batch(list(req["choices"]), add_special_tokens=False)
            questions.append((ctx, [list(c) for c in choice_ids], images))
        pad_id = common.pad_token_id(engine)
        context_tokens = [len(q[0]) for q in questions]

        systems = {
            "a": ("cultengine score (context once, choices forked)", lambda: run_ours(engine, requests, args, True)),
            "p": (
                "cultengine, one sequence per choice over the prefix cache (previous)",
                lambda: run_ours(engine, requests, args, True, per_choice=True),
            ),
            "b": (
                "cultengine, one sequence per choice, no prefix caching (vLLM prompt-logprobs)",
                lambda: run_ours(engine, requests, args, False, per_choice=True),
            ),
        }
        hf = None

        def hf_setup():
            nonlocal hf
            hf = common.hf_model(path, args.device, dtype, random_init)
            run_lm_eval_style(hf, questions[:1], pad_id, args.device)  # warm-up

        def hf_run():
            return run_lm_eval_style(hf, questions, pad_id, args.device)

        times = {k: [] for k in "apbc"}
        scores = {}

        def once(key, fn):
            t, scores[key] = bench_common.timed(fn, args.device)
            times[key].append(t)
            print(f"({key}): {t:.2f} s", flush=True)

        run_ours(engine, requests[:2], args, True)  # warm-up
        if cuda:  # one model on the device at a time
            for _ in range(args.repeats):
                for key in "apb":
                    once(key, systems[key][1])
            del engine
            systems = {k: (v[0], None) for k, v in systems.items()}
            gc.collect()
            torch.cuda.empty_cache()
            hf_setup()
            for _ in range(args.repeats):
                once("c", hf_run)
        else:  # interleaved, so a busy neighbour slows all three alike
            hf_setup()
            for _ in range(args.repeats):
                for key in "apb":
                    once(key, systems[key][1])
                once("c", hf_run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    names = {k: v[0] for k, v in systems.items()} | {"c": "transformers, lm-eval style (1 padded forward / question)"}
    prefill = {
        "a": PREFILL_TOKENS[(True, False)],
        "p": PREFILL_TOKENS[(True, True)],
        "b": PREFILL_TOKENS[(False, True)],
        "c": None,
    }
    rows = []
    for key in "apbc":
        wall = bench_common.median(times[key])
        rows.append(
            {
                "key": key,
                "system": names[key],
                "seconds": wall,
                "q_s": args.num_questions / wall,
                "prefill_tokens": prefill[key],
                "repeats_s": times[key],
            }
        )
    qps = {r["key"]: r["q_s"] for r in rows}
    for r in rows:
        r["vs_c"] = r["q_s"] / qps["c"]
    ratios = {"a_over_c": qps["a"] / qps["c"], "a_over_b": qps["a"] / qps["b"], "a_over_p": qps["a"] / qps["p"]}

    def compare(x, y):
        return {
            "same_argmax_fraction": float(np.mean(scores[x].argmax(1) == scores[y].argmax(1))),
            "max_abs_diff": float(np.abs(scores[x] - scores[y]).max()),
        }

    checks = {"a_vs_b": compare("a", "b"), "a_vs_p": compare("a", "p")}
    if not random_init:
        checks["a_vs_c"] = compare("a", "c")
        checks["b_vs_c"] = compare("b", "c")
    tolerance_ok = (
        all(c["max_abs_diff"] <= ATOL and c["same_argmax_fraction"] == 1.0 for c in checks.values())
        if args.dtype == "float32"
        else None
    )

    env = bench_common.environment(args.device)
    model_name = args.preset or "demo checkpoint (cultengine.bench.demo_checkpoint)"
    check_rows = [{"pair": k.replace("_vs_", " vs "), **v} for k, v in checks.items()]
    lines = [
        f"# {args.choices}-choice scoring: cultengine vs lm-eval-style transformers ({env['device']})",
        f"Model: {model_name}, {args.dtype}{', random weights' if random_init else ''}. {args.num_questions} "
        f"questions, one image each (contexts of {np.mean(context_tokens):.0f} tokens on average, image tokens "
        f"included), {args.choices} choices of 1-4 words; our KV block size {args.block_size}. "
        f"Median of {args.repeats} repeat(s); ours includes "
        f"request preprocessing, transformers' inputs are ready-made.",
        f"**Goal: (a) >= {GOAL_VS_LM_EVAL:.0f}x the lm-eval-style baseline (c) "
        f"({'met' if ratios['a_over_c'] >= GOAL_VS_LM_EVAL else 'NOT met'}: {ratios['a_over_c']:.2f}x); "
        f"(a) / (b) = {ratios['a_over_b']:.2f}x, (a) / (p) = {ratios['a_over_p']:.2f}x.** Prefill tokens computed: "
        f"(a) {prefill['a']}, (p) {prefill['p']}, (b) {prefill['b']}; the ideal, each context once and each "
        f"choice's tokens but its last: {ideal_prefill_tokens(questions)}.",
        bench_common.table(
            rows,
            ["key", "system", "seconds", "q_s", "prefill_tokens", "vs_c"],
            ["", "system", "wall s", "questions/s", "prefill tokens", "ratio vs (c)"],
        ),
        "Agreement"
        + (
            f" (float32: same argmax and |Δ log-likelihood| <= {ATOL:g}: {'yes' if tolerance_ok else 'NO'})"
            if tolerance_ok is not None
            else ""
        )
        + ":",
        bench_common.table(
            check_rows,
            ["pair", "same_argmax_fraction", "max_abs_diff"],
            ["pair", "same argmax (fraction of questions)", "max abs Δ log-likelihood"],
        ),
    ]
    data = {
        "bench": "score",
        "env": env,
        "model": model_name,
        "random_weights": random_init,
        "quick": args.quick,
        "workload": {
            "num_questions": args.num_questions,
            "choices": args.choices,
            "block_size": args.block_size,
            "prompt_len_words": args.prompt_len,
            "context_tokens_mean": float(np.mean(context_tokens)),
            "dtype": args.dtype,
            "seed": args.seed,
        },
        "rows": rows,
        "ratios": ratios,
        "goal_a_over_c": GOAL_VS_LM_EVAL,
        "checks": checks,
        "tolerance": ATOL,
        "tolerance_ok": tolerance_ok,
    }
    bench_common.write_results(args.name, args.device, "\n\n".join(lines), data, args.out)


if __name__ == "__main__":
    main()
