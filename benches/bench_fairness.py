"""One large request against the others: a small request's latency while `n=N, max_tokens=1` runs.

    .venv/bin/python benches/bench_fairness.py                 # demo checkpoint, CPU, n=10000
    .venv/bin/python benches/bench_fairness.py --n 2000 --small 3

The server runs in this process on 127.0.0.1 (uvicorn on a thread, the engine loop on another) on the demo
checkpoint the benches build. First the small request (a completion of `--small-tokens` tokens, greedy,
`ignore_eos`) runs alone (`--small` times: its latency with an idle server). Then one client sends the
large request (`/v1/completions`, `n=--n`, `max_tokens=1`) and, once its sequences are running, a second
client sends the small request `--small` times back to back. Reported: the small request's latency alone
and during the large one, and the large request's own time. The server's `--max-n` is raised to `--n`
where the server has that option. Nothing here is an assertion: it prints the figures (and `--json` writes
them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="samples of the large request")
    ap.add_argument("--small", type=int, default=5, help="small requests sent alone and during the large one")
    ap.add_argument("--small-tokens", type=int, default=12, help="output tokens of the small request")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from cultengine import Engine
    from cultengine.serve.app import BackgroundServer, ServeConfig, build_app
    from cultengine.serve.loop import EngineLoop

    engine = Engine("demo", threads=args.threads)
    loop = EngineLoop(engine)
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    limits = {k: v for k, v in {"max_n": args.n, "max_choices": args.n}.items() if k in names}
    config = ServeConfig(model_name="demo", **limits)
    small = {
        "model": "demo",
        "prompt": "Tell me about the festivals of India.",
        "max_tokens": args.small_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    large = {"model": "demo", "prompt": "Name a country.", "n": args.n, "max_tokens": 1, "temperature": 1, "seed": 0}
    out: dict = {"n": args.n, "small_tokens": args.small_tokens, "limits": limits}
    try:
        with BackgroundServer(build_app(loop, config)) as url:
            client = httpx.Client(base_url=url, timeout=3600)

            def timed_small() -> float:
                t = time.perf_counter()
                r = client.post("/v1/completions", json=small)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == args.small_tokens
                return time.perf_counter() - t

            timed_small()  # warm-up
            out["small_alone_s"] = [timed_small() for _ in range(args.small)]
            big: dict = {}

            def run_large() -> None:
                t = time.perf_counter()
                r = httpx.post(url + "/v1/completions", json=large, timeout=3600)
                big["seconds"], big["status"] = time.perf_counter() - t, r.status_code
                big["choices"] = len(r.json().get("choices", [])) if r.status_code == 200 else r.text[:200]

            thread = threading.Thread(target=run_large)
            thread.start()
            deadline = time.monotonic() + 600
            while loop.stats().get("num_running", 0) + loop.stats().get("num_waiting", 0) == 0:
                assert time.monotonic() < deadline and thread.is_alive(), big
                time.sleep(0.005)
            during = []
            for _ in range(args.small):
                if not thread.is_alive():
                    break
                during.append(timed_small())
            out["small_during_s"] = during
            thread.join()
            out["large"] = big
    finally:
        loop.close()
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
