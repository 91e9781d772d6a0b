"""`cultengine serve` against the same workload run offline through `Engine.generate`.

    .venv/bin/python benches/bench_serve.py                       # CPU: demo checkpoint, float32
    .venv/bin/python benches/bench_serve.py --quick               # smoke run
    .venv/bin/python benches/bench_serve.py --device cuda --preset llava-1.5-7b   # GPU, bf16, random weights

The workload is cultengine.profile's synthetic one (random words, one noise image per request, sent as
a PNG data URL), greedy, a fixed number of output tokens (`ignore_eos`). Offline: one `Engine.generate`
call over all requests (the images as the same PNG bytes). Served: the server runs in this process on
127.0.0.1 (uvicorn on a thread, the engine loop on another), and `--concurrency` client threads of the
`openai` client send `/v1/chat/completions` requests back to back until all are answered. Both sides
run on the same engine, its prefix and vision-encoder caches emptied before every run.

Reported per concurrency: requests/s and output tokens/s, the server's share of the offline throughput
(each served run follows an offline run of the same requests; the share is the median of the pairs'
throughput ratios, which cancels this VM's drift),
client-side request latency, and the engine loop's TTFT (request arrival to first token) and TPOT
(time per output token after the first) percentiles. The clients share the server's process and GIL, so
the share is a lower bound for a server in its own process.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402
from bench_generate import checkpoint_dir, make_engine, reset_caches, scheduler_kwargs, workload_args  # noqa: E402

GOAL_SHARE = 0.90  # of offline throughput, at concurrency 64


def png_requests(requests: list[dict]) -> list[dict]:
    """The workload with every image as PNG bytes (what a client sends)."""
    out = []
    for req in requests:
        content = []
        for part in req["messages"][0]["content"]:
            if part["type"] == "image":
                buf = io.BytesIO()
                part["image"].save(buf, "PNG")
                part = {"type": "image", "image": buf.getvalue()}
            content.append(part)
        out.append({"messages": [{"role": "user", "content": content}]})
    return out


def openai_messages(request: dict) -> list[dict]:
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p["image"]).decode()}}
        if p["type"] == "image"
        else p
        for p in request["messages"][0]["content"]
    ]
    return [{"role": "user", "content": content}]


def percentiles(values, scale: float = 1000.0) -> dict[str, float]:
    if len(values) == 0:
        return {}
    arr = np.asarray(values) * scale
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}


def run_offline(engine, requests, output_lens, args) -> dict:
    from cultengine import SamplingParams

    reset_caches(engine, **scheduler_kwargs(args))
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
    seconds, outs = bench_common.timed(lambda: engine.generate(requests, params, use_tqdm=False), args.device)
    assert not [o.error for o in outs if o.error]
    return {"seconds": seconds, "texts": [o.text for o in outs]}


def run_served(engine, requests, output_lens, concurrency: int, args) -> dict:
    import openai

    from cultengine.serve.app import BackgroundServer, ServeConfig, build_app
    from cultengine.serve.loop import EngineLoop

    reset_caches(engine, **scheduler_kwargs(args))
    loop = EngineLoop(engine)
    bodies = [openai_messages(r) for r in requests]
    texts: list[str | None] = [None] * len(requests)
    latencies = [0.0] * len(requests)
    next_index, lock = iter(range(len(requests))), threading.Lock()
    try:
        with BackgroundServer(build_app(loop, ServeConfig(model_name="bench"))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)

            def worker() -> None:
                while True:
                    with lock:
                        i = next(next_index, None)
                    if i is None:
                        return
                    start = time.perf_counter()
                    resp = client.chat.completions.create(
                        model="bench",
                        messages=bodies[i],
                        temperature=0,
                        max_tokens=output_lens[i],
                        extra_body={"ignore_eos": True},
                    )
                    latencies[i] = time.perf_counter() - start
                    texts[i] = resp.choices[0].message.content

            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
        ttft, tpot = list(loop.ttft.recent), list(loop.tpot.recent)
    finally:
        loop.close()
    return {
        "seconds": seconds,
        "texts": texts,
        "latency_ms": percentiles(latencies),
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument(
        "--preset", default=None, help="shape preset with random weights (cultengine profile --list-presets)"
    )
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", default="16", help="words per prompt: N, LO:HI or exp:MEAN")
    parser.add_argument("--output-len", default="32", help="tokens per output: N, LO:HI or exp:MEAN")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--name", default="serve", help="results file name prefix")
    bench_common.add_run_args(parser, "requests")
    args = parser.parse_args()
    bench_common.setup_run(args, "bench_serve")
    if args.quick:
        args.num_requests, args.repeats = 16, 1
    args.shared_fraction = 0.0
    levels = [int(c) for c in args.concurrency.split(",")]

    from cultengine.profile import build_workload

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        engine = make_engine(checkpoint_dir(args.preset, tmp), args, random_init=args.preset is not None)
        workload, output_lens = build_workload(engine, workload_args(args))
        requests = png_requests(workload)
        # Every served run right after an offline run of the same requests: the pair sees the same
        # machine (this VM's speed drifts by up to 1.5x within minutes), and their ratio cancels the drift.
        offline_runs, served_runs = {c: [] for c in levels}, {c: [] for c in levels}
        for _ in range(args.repeats):
            for c in levels:
                offline_runs[c].append(run_offline(engine, requests, output_lens, args))
                served_runs[c].append(run_served(engine, requests, output_lens, c, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out_tokens = sum(output_lens)
    all_offline = [r for runs in offline_runs.values() for r in runs]
    offline_s = bench_common.median([r["seconds"] for r in all_offline])
    rows = [
        {
            "system": "offline Engine.generate",
            "concurrency": "-",
            "seconds": offline_s,
            "req_s": len(requests) / offline_s,
            "out_tok_s": out_tokens / offline_s,
            "share": 1.0,
            "repeats_s": [r["seconds"] for r in all_offline],
        }
    ]
    reference = all_offline[0]["texts"]
    identical = True
    for c in levels:
        runs = served_runs[c]
        median_run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        s = median_run["seconds"]
        identical &= all(r["texts"] == reference for r in runs + offline_runs[c])
        paired = [o["seconds"] / r["seconds"] for o, r in zip(offline_runs[c], runs, strict=True)]
        rows.append(
            {
                "system": "cultengine serve",
                "concurrency": c,
                "seconds": s,
                "req_s": len(requests) / s,
                "out_tok_s": out_tokens / s,
                "share": bench_common.median(paired),
                "repeat_shares": paired,
                "share_range": f"{min(paired):.2f}-{max(paired):.2f}",
                "repeats_s": [r["seconds"] for r in runs],
                **{f"latency_{k}": v for k, v in median_run["latency_ms"].items()},
                **{f"ttft_{k}": v for k, v in median_run["ttft_ms"].items()},
                **{f"tpot_{k}": v for k, v in median_run["tpot_ms"].items()},
            }
        )
    at64 = next((r for r in rows[1:] if r["concurrency"] == 64), None)
    share64 = at64["share"] if at64 else None
    model = args.preset or "demo checkpoint (cultengine.bench.demo_checkpoint)"
    goal = (
        ""
        if at64 is None
        else f"**Goal: >= {GOAL_SHARE:.0%} of offline throughput at concurrency 64 "
        f"({'met' if share64 >= GOAL_SHARE else 'NOT met'}: {share64:.0%}, pairs {at64['share_range']}).**\n\n"
    )
    md = (
        f"# cultengine serve vs offline Engine.generate ({bench_common.device_label(args.device)})\n\n"
        f"Model: {model}, {args.dtype}. {len(requests)} chat requests, one image each (PNG data URL), "
        f"{out_tokens} output tokens in all (greedy, fixed lengths `{args.output_len}`). Median of "
        f"{args.repeats} repeat(s); each served run follows an offline run, and a share is the median of "
        f"those pairs' throughput ratios. Server and clients share one process; TTFT and TPOT are "
        f"the engine loop's (from request arrival), latency is the client's.\n\n"
        + goal
        + bench_common.table(
            rows,
            [
                "system",
                "concurrency",
                "seconds",
                "req_s",
                "out_tok_s",
                "share",
                "share_range",
                "latency_p50",
                "latency_p99",
                "ttft_p50",
                "ttft_p90",
                "ttft_p99",
                "tpot_p50",
                "tpot_p90",
                "tpot_p99",
            ],
            [
                "system",
                "clients",
                "wall s",
                "req/s",
                "out tok/s",
                "share of offline",
                "pairs' range",
                "latency p50 ms",
                "p99",
                "TTFT p50 ms",
                "p90",
                "p99",
                "TPOT p50 ms",
                "p90",
                "p99",
            ],
        )
        + f"\n\nServed outputs identical to offline on every run: {'yes' if identical else 'NO'}.\n"
    )
    data = {
        "bench": "serve",
        "env": bench_common.environment(args.device),
        "model": model,
        "random_weights": args.preset is not None,
        "quick": args.quick,
        "workload": {
            "num_requests": len(requests),
            "prompt_len_words": args.prompt_len,
            "output_len": args.output_len,
            "output_tokens": out_tokens,
            "dtype": args.dtype,
            "max_num_seqs": args.max_num_seqs,
            "seed": args.seed,
            "repeats": args.repeats,
        },
        "rows": rows,
        "share_at_64": share64,
        "goal_share": GOAL_SHARE,
        "identical_outputs": identical,
    }
    bench_common.write_results(args.name, args.device, md, data, args.out)


if __name__ == "__main__":
    main()
