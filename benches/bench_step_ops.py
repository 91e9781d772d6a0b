"""What one decode step costs the host on the CPU path: aten ops issued per step and their self CPU time, from
torch's profiler, on the demo checkpoint (8 sequences, 64 greedy tokens each, one thread).

    .venv/bin/python benches/bench_step_ops.py                       # this checkout's cultengine
    PYTHONPATH=/tmp/pkg-old .venv/bin/python benches/bench_step_ops.py   # another build, for a before/after

An op count does not drift with the machine's speed, as wall time does on a shared VM: a before/after of
host-side work (per-layer index and mask building, extra casts) reads plainly in it.
"""

from __future__ import annotations

import argparse
import json

from torch.profiler import ProfilerActivity, profile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--overlap", choices=("default", "on", "off"), default="default")
    args = parser.parse_args(argv)

    import cultengine
    from cultengine import Engine, SamplingParams
    from cultengine.bench import demo_checkpoint

    kw = {} if args.overlap == "default" else {"overlap_scheduling": args.overlap == "on"}
    engine = Engine(demo_checkpoint.ensure(), dtype="float32", threads=1, **kw)
    requests = [{"prompt": f"Tell me about the festival of lights, story number {i}"} for i in range(args.sequences)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    engine.generate(requests, params, use_tqdm=False)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(requests, params, use_tqdm=False)
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    steps = args.tokens
    result = {
        "cultengine": cultengine.__file__,
        "sequences": args.sequences,
        "steps": steps,
        "aten_ops_per_step": round(sum(e.count for e in aten) / steps, 1),
        "self_cpu_ms_per_step": round(sum(e.self_cpu_time_total for e in events) / steps / 1000, 3),
        "most_issued": {e.key: round(e.count / steps, 1) for e in sorted(aten, key=lambda e: -e.count)[:10]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
