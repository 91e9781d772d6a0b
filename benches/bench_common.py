"""Helpers shared by the speed benchmarks: device naming, timing, results files.

Every bench writes `benches/results/<bench>-<device>.md` (a markdown table) and `.json` (the raw
figures), where <device> is `cpu-<n>cores` or the CUDA device name, lower-cased and dashed.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_label(device: str | torch.device) -> str:
    """`cpu-<n>cores` or the CUDA device name, as used in results file names."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: str | torch.device) -> dict:
    device = torch.device(device)
    import numpy

    env = {
        "device": device_label(device),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def timed(fn, device: str | torch.device = "cpu"):
    """(seconds, result) of one call, the device synchronised on both sides."""
    gc.collect()
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    bench: str, device: str | torch.device, markdown: str, data: dict, out_dir: Path | None = None
) -> Path:
    """Write `<bench>-<device>.{md,json}`, print the markdown, return the path stem."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{bench}-{device_label(device)}"
    stem.with_suffix(".md").write_text(markdown.rstrip() + "\n")
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    return stem


def add_run_args(parser, what: str) -> None:
    """Engine sizing and run controls shared by the end-to-end benches."""
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 on the CPU, 1 on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: 8 {what}, one repeat")
    parser.add_argument("--out", type=Path, help="results folder (default benches/results)")


def setup_run(args, bench: str) -> bool:
    """Apply --threads, check the device, default dtype and repeats; True on CUDA."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"{bench}: --device cuda asked for, but torch sees no CUDA device")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (1 if cuda else 3)
    return cuda
