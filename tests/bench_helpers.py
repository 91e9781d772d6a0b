"""Shared helpers for the bench tests: tiny images, a deterministic stand-in engine, CLI args."""

from __future__ import annotations

import argparse
import hashlib
import io

from PIL import Image

from cultengine.outputs import ChoiceScore, GenerationOutput, Sample, ScoreOutput


def png_bytes(color=(200, 30, 30), size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _text(req: dict) -> str:
    parts = []
    for m in req["messages"]:
        for c in m["content"]:
            parts.append(c["text"] if c["type"] == "text" else str(c["image"])[:40])
    return "\n".join(parts)


def _h(*xs: str) -> float:
    return int(hashlib.sha1("|".join(xs).encode()).hexdigest()[:8], 16) / 2**32


class FakeEngine:
    """Answers depend only on the request, never on batching (as the real engine guarantees)."""

    def __init__(self, *_, **__):
        self.calls = 0
        self.tokens = 0

    def score(self, requests, use_tqdm=False):
        self.calls += 1
        outs = []
        for i, r in enumerate(requests):
            ctx = _text(r)
            self.tokens += len(ctx)
            outs.append(ScoreOutput(i, [ChoiceScore(c, -10 * _h(ctx, c), 2, False) for c in r["choices"]]))
        return outs

    def generate(self, requests, params, use_tqdm=False):
        self.calls += 1
        outs = []
        for i, r in enumerate(requests):
            ctx = _text(r)
            text = "ABCD"[int(_h(ctx) * 4)]
            outs.append(GenerationOutput(i, [1, 2], [Sample(text, [5], "stop", [-0.1])]))
        return outs

    def stats(self):
        return {
            "prefix_cache_hit_tokens": self.tokens // 2,
            "prefix_cache_queried_tokens": self.tokens,
            "prefill_tokens_computed": self.tokens // 2,
            "prompt_tokens": self.tokens,
            "generated_tokens": self.calls,
        }


def bench_args(**kw) -> argparse.Namespace:
    base = dict(
        model=None,
        data=None,
        suite="mcq",
        output_dir=None,
        limit=None,
        device="cpu",
        dtype="auto",
        scoring="loglik",
        circular=False,
        batch=64,
        shard=None,
        format="auto",
        template=None,
        overwrite=False,
        image_root=None,
        allow_absolute_image_paths=False,
    )
    base.update(kw)
    return argparse.Namespace(**base)
