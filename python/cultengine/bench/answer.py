"""One engine call over a chunk of benchmark rows, and the record each row leaves in results.jsonl: what a
single-process run, its torchrun ranks and the Ray replicas all do with a batch."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from . import data, metrics
from .suites import (
    LONG_MAX_TOKENS,
    MAX_TOKENS,
    SuiteConfig,
    build_requests,
    input_hash,
    long_answer,
    prompt_hash,
    score,
)


def record(row: data.Row, cfg: SuiteConfig, outs: list, batch_s: float, n: int) -> dict:
    rec = {
        "id": row.id,
        "prompt_hash": prompt_hash(row, cfg),
        "input_hash": input_hash(row, cfg),
        **score(row, cfg, outs),
    }
    if "prompt_lang" in row.meta:  # --cvqa-lang both: the English-vs-local gap needs it
        rec["prompt_lang"] = row.meta["prompt_lang"]
    rec.update(
        groups=row.groups(),
        western=row.western,
        cluster=row.image_key()[:16] or row.id,
        chance=metrics.chance(len(row.options), cfg.circular) if cfg.suite == "mcq" else None,
        timings={"batch_s": round(batch_s, 4), "sample_s": round(batch_s / n, 5)},
    )
    return rec


def evaluate_chunk(engine, chunk: list[data.Row], cfg: SuiteConfig) -> list[dict]:
    """One engine call over `chunk`: each row's result record (what results.jsonl holds)."""
    from ..sampling import SamplingParams

    params = {
        False: SamplingParams(max_tokens=MAX_TOKENS[cfg.suite], temperature=0.0, stop=["\n"]),
        True: SamplingParams(max_tokens=LONG_MAX_TOKENS, temperature=0.0),
    }  # by long_answer(row)
    reqs = [build_requests(r, cfg) for r in chunk]
    flat = [q for rs in reqs for q in rs]
    t0 = time.perf_counter()
    outs = (
        engine.score(flat, use_tqdm=False)
        if cfg.scoring == "loglik"
        else engine.generate(
            flat,
            [params[long_answer(r, cfg.suite)] for r, rs in zip(chunk, reqs, strict=True) for _ in rs],
            use_tqdm=False,
        )
    )
    dt = time.perf_counter() - t0
    recs, k = [], 0
    for row, rs in zip(chunk, reqs, strict=True):
        recs.append(record(row, cfg, outs[k : k + len(rs)], dt, len(chunk)))
        k += len(rs)
    return recs


def log_stats(stats_file: Path, session: str, stats: dict, provenance: dict | None) -> None:
    """One line of engine_stats.jsonl: a batch's engine counters (and, first, what ran)."""
    line = {"session": session, "stats": stats, **({"provenance": provenance} if provenance else {})}
    with stats_file.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def answer_locally(engine, rows: list[data.Row], cfg: SuiteConfig, batch: int) -> Iterator[tuple[list, list[dict]]]:
    """`rows` answered by `engine` in batches of `batch`: each batch's records with what the engine reported
    (its `session`, cumulative `stats`; `provenance`, first only), as `replicas.Replicas.map` yields them."""
    session = uuid.uuid4().hex
    for start in range(0, len(rows), batch):
        recs = evaluate_chunk(engine, rows[start : start + batch], cfg)
        provenance = engine.provenance() if start == 0 and hasattr(engine, "provenance") else None
        yield recs, [{"session": session, "stats": engine.stats(), "provenance": provenance}]
