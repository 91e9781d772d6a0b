"""Peak memory of the memory bombs from untrusted text: hostile chat templates, processor configs and request
options that blow up a small image, a request of eight 8000x7999 images, and eight concurrent requests each
at the per-request pixel limit (with no global image budget, then with `--max-image-memory 2 GiB`).

    .venv/bin/python benches/bench_bombs.py                          # the installed cultengine
    PYTHONPATH=/tmp/pkg-before .venv/bin/python benches/bench_bombs.py --json before.json   # another build

Each bomb runs in a fresh subprocess whose address space is capped (`--cap-gib`, so an unbounded bomb ends
in a MemoryError instead of taking the machine); reported per bomb: the outcome (refused with the error's
first words, rendered, or MemoryError at the cap), the seconds it took, and the child's peak RSS above the
same child's RSS just before the bomb (imports and fixtures excluded). Nothing here is an assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

MESSAGES = [{"role": "user", "content": "hi " * 300}]
TEMPLATES = {
    "template replace('', 1M x)": "{{ messages[0].content.replace('', 'x' * 1000000) }}",
    "template 'a'.center(9e8)": "{{ 'a'.center(900000000) }}",
    "template '%900000000s'|format": "{{ '%900000000s'|format('a') }}",
    "template sort of 10M chars": "{{ ('ab' * 5000000)|sort|join }}",
    "template ~ doubling x31": (
        "{% set ns = namespace(s='x') %}{% for i in range(31) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        "{{ ns.s|length }}"
    ),
}

# Each child: set up (not measured), then `BOMB` (measured). `RESULT` is what it prints on success.
SETUP = {
    "template": "from cultengine.chat import render_chat\nM = {messages!r}\nT = {template!r}",
    "clip": (
        "from PIL import Image\nfrom cultengine.image import ClipImageProcessor\n"
        "proc = ClipImageProcessor({{'size': {{'shortest_edge': 60000}}}})\nimg = Image.new('RGB', (40, 30))"
    ),
    "qwen": (
        "from PIL import Image\nfrom cultengine.models.qwen2_vl import QwenImageProcessor\n"
        "proc = QwenImageProcessor({{'min_pixels': {config_min}, 'max_pixels': 10**10}})\n"
        "img = Image.new('RGB', (40, 30))"
    ),
    "request": (
        "import base64, io\nfrom PIL import Image\nfrom cultengine import Engine\n"
        "from cultengine.serve.app import ServeConfig, to_engine_messages\n"
        "buf = io.BytesIO(); Image.new('RGB', (8000, 7999), 'white').save(buf, 'PNG')\n"
        "url = 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()\n"
        "engine = Engine('demo')\n"
        "msgs = [{{'role': 'user', 'content': [{{'type': 'image_url', 'image_url': {{'url': url}}}}] * 8"
        " + [{{'type': 'text', 'text': 'Where?'}}]}}]\n"
        "config = ServeConfig(model_name='demo', max_request_bytes=1 << 30)"
    ),
    "concurrent": (
        "import io\nfrom concurrent.futures import ThreadPoolExecutor\nfrom PIL import Image\n"
        "from cultengine import Engine, SamplingParams\nfrom cultengine.serve.loop import EngineLoop, ServerBusy\n"
        "def png(k):\n    buf = io.BytesIO(); Image.new('RGB', (4000, 4000), (k, 0, 0)).save(buf, 'PNG')\n"
        "    return buf.getvalue()\n"
        "req = {{'messages': [{{'role': 'user', 'content': [{{'type': 'image', 'image': png(k)}} for k in range(8)]"
        " + ['Where?']}}]}}\n"
        "loop = EngineLoop(Engine('demo'), max_image_memory={budget})\n"
        "def one(_):\n"
        "    try:\n"
        "        a = loop.generate(req, SamplingParams(max_tokens=1), 1, image_pixels=8 * 4000 * 4000).result()\n"
        "        return [f.result() for f in a.results] and 'served'\n"
        "    except ServerBusy:\n"
        "        return '503'"
    ),
}
BOMB = {
    "template": "r = render_chat(T, M)[0]; RESULT = f'rendered {len(r):,} chars'",
    "clip": "RESULT = 'pixels ' + str(tuple(proc(img).shape))",
    "qwen": "RESULT = 'patches ' + str(tuple(proc.process(img, min_pixels={request_min})[0].shape))",
    "request": "(p,) = engine.prepare([{'messages': to_engine_messages(msgs, config)[0]}]); RESULT = str(p)[:80]",
    "concurrent": (
        "with ThreadPoolExecutor(8) as pool:\n    got = list(pool.map(one, range(8)))\n"
        "loop.close()\nRESULT = f\"{got.count('served')} served, {got.count('503')} refused with 503\""
    ),
}

CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
{setup}
def rss_kib():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1])
before = rss_kib()
t0 = time.perf_counter()
try:
{bomb}
    outcome = RESULT
except MemoryError:
    outcome = 'MemoryError at the address-space cap'
except Exception as e:
    outcome = 'refused: ' + (type(e).__name__ + ': ' + str(e))[:150]
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(repr((outcome, seconds, peak - before)))
"""


def cases() -> dict[str, tuple[str, str]]:
    out = {
        name: (SETUP["template"].format(messages=MESSAGES, template=t), BOMB["template"])
        for name, t in TEMPLATES.items()
    }
    out["processor shortest_edge 60000 on 40x30"] = (SETUP["clip"].format(), BOMB["clip"])
    out["processor min_pixels 1e9 on 40x30"] = (
        SETUP["qwen"].format(config_min=10**9),
        BOMB["qwen"].format(request_min=None),
    )
    out["request min_pixels 2e8 on 40x30"] = (
        SETUP["qwen"].format(config_min=56 * 56),
        BOMB["qwen"].format(request_min=2 * 10**8),
    )
    out["request of 8 data-URL PNGs 8000x7999"] = (SETUP["request"].format(), BOMB["request"])
    for label, budget in (("no global budget", 1 << 60), ("--max-image-memory 2 GiB", 2 << 30)):
        out[f"8 concurrent requests of 8x16 MP, {label}"] = (
            SETUP["concurrent"].format(budget=budget),
            BOMB["concurrent"],
        )
    return out


def run(setup: str, bomb: str, cap: int, timeout: float) -> dict:
    code = CHILD.format(cap=cap, setup=setup, bomb=textwrap.indent(bomb, "    "))
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=os.environ
        )
    except subprocess.TimeoutExpired:
        return {"outcome": f"still running after {timeout:g} s (killed)", "seconds": timeout, "peak_mib": None}
    if done.returncode:
        return {"outcome": f"crashed: {done.stderr.strip().splitlines()[-1][:150]}", "seconds": None, "peak_mib": None}
    outcome, seconds, kib = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's repr
    return {"outcome": outcome, "seconds": round(seconds, 3), "peak_mib": round(kib / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap-gib", type=float, default=12.0, help="address-space cap of each child")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a child is killed")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--label", help="names the build in the JSON (default: cultengine's version)")
    args = ap.parse_args()
    import cultengine

    cap = int(args.cap_gib * (1 << 30))
    # Which build ran, in words: an absolute path of this machine would mean nothing in the repository.
    build = args.label or f"cultengine {cultengine.__version__}"
    figures = {"cultengine": build, "cap_gib": args.cap_gib, "bombs": {}}
    for name, (setup, bomb) in cases().items():
        figures["bombs"][name] = r = run(setup, bomb, cap, args.timeout)
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f} MiB"
        print(f"{name:42s} {peak:>12s} {r['seconds'] if r['seconds'] is not None else '-':>8}s  {r['outcome']}")
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
