"""Scheduler step time: the Rust `cultengine._core.Scheduler` against the Python baseline of the same policy.

    .venv/bin/python benches/bench_scheduler.py            # 64 / 256 / 512 running decode sequences
    .venv/bin/python benches/bench_scheduler.py --quick    # smoke run
    .venv/bin/python -m pytest benches/bench_scheduler.py  # the same step under pytest-benchmark

Steady state: every prompt (200-600 random tokens, so block tables are realistic) is admitted and
prefilled first; then each timed step is `schedule()` + `update()` with fake sampled tokens, all
sequences decoding. Block size 16, a large block pool (no preemption), prefix caching on (random
prompts: no hits). The Rust side also detokenizes every sampled token incrementally (stop-string
checks); the Python baseline does not, so it is the cheaper policy of the two.

Goal: <= 100 us per step at 512 sequences and >= 10x faster than the Python baseline.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402
from py_scheduler import PyScheduler  # noqa: E402

BLOCK_SIZE = 16
GOAL_US_AT_512 = 100.0
GOAL_SPEEDUP = 10.0


def _tokenizer():
    from cultengine import _core
    from cultengine.bench import demo_checkpoint

    return _core.Tokenizer.from_file(str(demo_checkpoint.ensure() / "tokenizer.json"))


class _Harness:
    """One scheduler filled with `num_seqs` decoding sequences, stepped with pre-drawn fake tokens."""

    def __init__(self, impl: str, num_seqs: int, max_steps: int, seed: int = 0, tokenizer=None):
        rng = np.random.default_rng(seed)
        self.impl = impl
        prompt_lens = rng.integers(200, 601, num_seqs)
        # Ids 100..1999 of the demo vocabulary: ordinary tokens (no special ones, so no EOS).
        prompts = [rng.integers(100, 2000, n).tolist() for n in prompt_lens]
        max_tokens = max_steps + 8
        max_model_len = int(prompt_lens.max()) + max_tokens + BLOCK_SIZE
        num_blocks = num_seqs * (-(-max_model_len // BLOCK_SIZE)) + 64  # never preempts
        prefill_budget = int(prompt_lens.sum())  # admits every prompt in one step
        if impl == "rust":
            from cultengine import _core

            self.sched = _core.Scheduler(
                tokenizer or _tokenizer(),
                num_blocks=num_blocks,
                block_size=BLOCK_SIZE,
                max_num_seqs=num_seqs,
                max_num_batched_tokens=prefill_budget,
                max_model_len=max_model_len,
                enable_prefix_caching=True,
                eos_token_ids=[],
            )
            for i, p in enumerate(prompts):
                self.sched.add_sequence(i, p, [], max_tokens=max_tokens, ignore_eos=True)
        else:
            self.sched = PyScheduler(
                num_blocks, BLOCK_SIZE, max_num_seqs=num_seqs, max_num_batched_tokens=prefill_budget
            )
            for i, p in enumerate(prompts):
                self.sched.add_sequence(i, p, max_tokens)
        # Fake sampled tokens, drawn up front so their cost is outside the timed steps.
        self.tokens = rng.integers(100, 2000, (max_steps + 2, num_seqs)).astype(np.int64)
        self.logprobs = np.full(num_seqs, -1.0, dtype=np.float32)
        self.no_lp = np.zeros(0, dtype=np.float32)
        self.no_greedy = np.zeros(0, dtype=np.bool_)
        self.num_seqs = num_seqs
        self.steps = 0
        self.step()  # the prefill step: every prompt admitted and computed
        assert self.num_running() == num_seqs, "not every prompt was admitted"

    def num_running(self) -> int:
        return self.sched.num_running if self.impl == "rust" else len(self.sched.running)

    def step(self) -> None:
        plan = self.sched.schedule()
        sampled = self.tokens[self.steps]
        if self.impl == "rust":
            n = len(plan.sample_indices)
            finished = self.sched.update(sampled[:n], self.logprobs[:n], self.no_lp, self.no_greedy)
        else:
            finished = self.sched.update(sampled)
        self.steps += 1
        assert not finished


def measure(impl: str, num_seqs: int, steps: int, repeats: int, tokenizer=None) -> dict:
    """Median over `repeats` fresh schedulers of the mean wall and CPU time of `steps` decode steps."""
    wall, cpu, internal = [], [], []
    for r in range(repeats):
        h = _Harness(impl, num_seqs, steps + 5, seed=r, tokenizer=tokenizer)
        for _ in range(5):  # warm-up decode steps
            h.step()
        before = h.sched.stats()["schedule_ns"] if impl == "rust" else 0
        gc.collect()
        gc.disable()
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                h.step()
            w1, c1 = time.perf_counter(), time.process_time()
        finally:
            gc.enable()
        wall.append((w1 - w0) / steps * 1e6)
        cpu.append((c1 - c0) / steps * 1e6)
        if impl == "rust":
            internal.append((h.sched.stats()["schedule_ns"] - before) / steps / 1e3)
        del h
    return {
        "us_per_step": bench_common.median(wall),
        "cpu_us_per_step": bench_common.median(cpu),
        "rust_internal_us_per_step": bench_common.median(internal) if internal else None,
        "repeats_us": wall,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 256, 512], help="numbers of running decode sequences"
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps per repeat (Rust)")
    parser.add_argument("--py-steps", type=int, default=30, help="timed steps per repeat (Python baseline)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 and 256 sequences, few steps")
    parser.add_argument("--out", type=Path, help="results folder (default benches/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.py_steps, args.repeats = [64, 256], 20, 5, 2

    tok = _tokenizer()
    rows = []
    for n in args.sizes:
        rust = measure("rust", n, args.steps, args.repeats, tokenizer=tok)
        py = measure("python", n, args.py_steps, args.repeats)
        row = {
            "num_seqs": n,
            "rust_us": rust["us_per_step"],
            "rust_cpu_us": rust["cpu_us_per_step"],
            "rust_internal_us": rust["rust_internal_us_per_step"],
            "python_us": py["us_per_step"],
            "python_cpu_us": py["cpu_us_per_step"],
            "speedup": py["us_per_step"] / rust["us_per_step"],
            "rust_repeats_us": rust["repeats_us"],
            "python_repeats_us": py["repeats_us"],
        }
        rows.append(row)
        print(
            f"{n:4d} seqs: rust {row['rust_us']:.1f} us/step, python {row['python_us']:.1f} us/step, "
            f"{row['speedup']:.1f}x",
            flush=True,
        )

    at512 = next((r for r in rows if r["num_seqs"] == 512), None)
    goal = {"us_at_512": GOAL_US_AT_512, "speedup": GOAL_SPEEDUP}
    if at512:
        goal["met_us_at_512"] = at512["rust_us"] <= GOAL_US_AT_512
    goal["met_speedup"] = all(r["speedup"] >= GOAL_SPEEDUP for r in rows)
    device = "cpu"
    env = bench_common.environment(device)
    md = "\n\n".join(
        [
            f"# Scheduler step time: Rust vs Python baseline ({env['device']})",
            f"Steady-state decode: schedule() + update() per step, fake sampled tokens; prompts of 200-600 tokens, "
            f"block size {BLOCK_SIZE}; median of {args.repeats} repeats of {args.steps} (Rust) / {args.py_steps} "
            f"(Python) steps. `rust internal` is the scheduler's own clock (stats()['schedule_ns']), without the "
            f"PyO3 array conversions.",
            f"**Goal: <= {GOAL_US_AT_512:.0f} us per step at 512 sequences"
            + (f" ({'met' if goal.get('met_us_at_512') else 'NOT met'})" if at512 else "")
            + f", and >= {GOAL_SPEEDUP:.0f}x the Python baseline ({'met' if goal['met_speedup'] else 'NOT met'}).**",
            bench_common.table(
                rows,
                ["num_seqs", "rust_us", "rust_cpu_us", "rust_internal_us", "python_us", "python_cpu_us", "speedup"],
                [
                    "running seqs",
                    "Rust µs/step",
                    "Rust CPU µs",
                    "Rust internal µs",
                    "Python µs/step",
                    "Python CPU µs",
                    "speedup (Python / Rust)",
                ],
            ),
        ]
    )
    data = {"bench": "scheduler", "env": env, "quick": args.quick, "block_size": BLOCK_SIZE, "goal": goal, "rows": rows}
    bench_common.write_results("scheduler", device, md, data, args.out)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: `.venv/bin/python -m pytest benches/bench_scheduler.py`
# ---------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("num_seqs", [64, 256, 512])
    @pytest.mark.parametrize("impl", ["rust", "python"])
    def test_scheduler_step(benchmark, impl, num_seqs):
        rounds = 200 if impl == "rust" else 20
        h = _Harness(impl, num_seqs, max_steps=rounds + 20)
        benchmark.group = f"scheduler step, {num_seqs} decoding sequences"
        benchmark.pedantic(h.step, rounds=rounds, iterations=1, warmup_rounds=5)
        assert h.num_running() == num_seqs


if __name__ == "__main__":
    main()
