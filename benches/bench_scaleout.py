"""Scale-out side by side: tensor parallelism (1 rank vs N ranks, generation tok/s, tokens compared) and Ray Data
replicas (the embedded demo bench as one process, on 1 replica and on 2, whole-command wall time, summaries
compared), interleaved repeats, reported as ratios.

    python benches/bench_scaleout.py                  # CPU: the demo checkpoint, gloo ranks, a local Ray cluster
    python benches/bench_scaleout.py --device cuda    # one GPU per rank / per replica

On a CPU both cost more than they give (a broadcast and two all-reduces per layer each step; a Ray cluster's
start): what they are for is models and runs larger than one device, which this measures the overhead of.
Writes benches/results/scaleout-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import environment, fmt, median, write_results


def tensor_parallel(args) -> dict:
    """Generation tok/s of the demo checkpoint on 1 rank and on `args.ranks`, fresh engine per repeat."""
    from cultengine import Engine, SamplingParams
    from cultengine.bench import demo_checkpoint

    path = demo_checkpoint.ensure()
    reqs = [
        {"messages": [{"role": "user", "content": f"Tell me about festival number {i} in a far country."}]}
        for i in range(args.num_requests)
    ]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    cpu = args.device == "cpu"
    settings = {
        1: (os.cpu_count() if cpu else None),
        args.ranks: (max(1, os.cpu_count() // args.ranks) if cpu else None),
    }
    tok_s: dict[int, list[float]] = {1: [], args.ranks: []}
    tokens: dict[int, list] = {}
    for _ in range(args.repeats):
        for ranks, threads in settings.items():
            engine = Engine(path, device=args.device, tensor_parallel_size=ranks, threads=threads)
            try:
                engine.generate(reqs[:2], params, use_tqdm=False)  # warm-up
                start = time.perf_counter()
                outs = engine.generate(reqs, params, use_tqdm=False)
                tok_s[ranks].append(args.num_requests * args.output_len / (time.perf_counter() - start))
                tokens[ranks] = [o.samples[0].token_ids for o in outs]
            finally:
                engine.close()
    return {
        "threads_per_rank": settings,
        "tok_s": tok_s,
        "median_tok_s": {r: median(v) for r, v in tok_s.items()},
        "ratio": median(tok_s[args.ranks]) / median(tok_s[1]),
        "tokens_identical": tokens[1] == tokens[args.ranks],
    }


def _bench(out: Path, device: str, *extra: str) -> float:
    cmd = [sys.executable, "-m", "cultengine.cli", "bench", "--device", device, "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _rounded(x):
    # Replicas batch samples differently, which moves a log-likelihood in its 7th digit, never an answer.
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return [_rounded(v) for v in x] if isinstance(x, list) else x


def _metrics(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return _rounded({k: v for k, v in s.items() if k not in ("run", "config")})


def ray_replicas(args) -> dict:
    """Whole-command wall time of the embedded demo bench: one process, 1 Ray replica, 2 replicas."""
    cpu = args.device == "cpu"
    setups = {
        "one process": ["--threads", str(os.cpu_count())] if cpu else [],
        "1 Ray replica": ["--ray-replicas", "1", *(["--threads", str(os.cpu_count())] if cpu else [])],
        "2 Ray replicas": ["--ray-replicas", "2", *(["--threads", str(max(1, os.cpu_count() // 2))] if cpu else [])],
    }
    walls: dict[str, list[float]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory() as tmp:
        _bench(Path(tmp) / "warm", args.device)  # builds the demo checkpoint and data once
        summaries = {}
        for rep in range(args.repeats):
            for name, extra in setups.items():
                out = Path(tmp) / f"{name.replace(' ', '-')}-{rep}"
                walls[name].append(_bench(out, args.device, *extra))
                summaries[name] = _metrics(out)
    base = median(walls["one process"])
    return {
        "wall_s": walls,
        "median_wall_s": {k: median(v) for k, v in walls.items()},
        "speed_vs_one_process": {k: base / median(v) for k, v in walls.items()},
        "summaries_identical": all(s == summaries["one process"] for s in summaries.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="tensor-parallel ranks beside 1")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true", help="tensor parallelism only")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 requests of 4 tokens, one repeat, no Ray")
    parser.add_argument("--out", type=Path, help="results folder (default benches/results)")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.output_len, args.repeats, args.skip_ray = 4, 4, 1, True
    tp = tensor_parallel(args)
    data = {"environment": environment(args.device), "tensor_parallel": tp}
    lines = [
        f"# Scale-out on {args.device}",
        "",
        f"Tensor parallelism, demo checkpoint, {args.num_requests} requests x {args.output_len} tokens "
        f"(`python benches/bench_scaleout.py`), {args.repeats} interleaved repeats, fresh engine each:",
        "",
        "| ranks | tok/s (median) | vs 1 rank | tokens identical to 1 rank |",
        "|---|---|---|---|",
    ]
    for ranks, v in tp["median_tok_s"].items():
        lines.append(
            f"| {ranks} | {fmt(v)} | {fmt(v / tp['median_tok_s'][1])} | {fmt(tp['tokens_identical'] or ranks == 1)} |"
        )
    if not args.skip_ray:
        ray = ray_replicas(args)
        data["ray"] = ray
        lines += [
            "",
            "Ray Data replicas, the embedded demo bench (`cultengine bench`), whole-command wall time:",
            "",
            "| setup | wall s (median) | speed vs one process | summary as one process |",
            "|---|---|---|---|",
        ]
        for name, v in ray["median_wall_s"].items():
            lines.append(
                f"| {name} | {fmt(v)} | {fmt(ray['speed_vs_one_process'][name])} | {fmt(ray['summaries_identical'])} |"
            )
    write_results("scaleout", args.device, "\n".join(lines), data, args.out)


if __name__ == "__main__":
    main()
