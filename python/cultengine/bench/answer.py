"""One engine call over a chunk of benchmark rows, and the record each row leaves in results.jsonl: what a
single-process run, its torchrun ranks and the Ray replicas all do with a batch."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from ..replicas import Replicas
    from ..runlog import ResultLog


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


def evaluate_on_replicas(
    replicas: Replicas,
    rows: list[data.Row],
    cfg: SuiteConfig,
    writer: ResultLog,
    batch: int,
    done: int,
    total: int,
    stats_file: Path,
    quiet: bool,
) -> dict | None:
    """`rows` answered by Ray engine replicas (`replicas.Replicas`), each record written as it comes back;
    returns the first replica's engine provenance."""
    import uuid
    from functools import partial

    from .. import console

    session, provenance = uuid.uuid4().hex, None
    bar = console.bar(total, initial=done, unit="sample", desc=f"bench ({replicas.replicas} Ray replicas)", quiet=quiet)
    t_start, answered = time.perf_counter(), 0
    try:
        for recs, metas in replicas.map(rows, partial(evaluate_chunk, cfg=cfg), batch):
            writer.write(recs)
            for meta in metas:
                provenance = provenance or meta["provenance"]
                log_stats(stats_file, session, meta["stats"], meta["provenance"])
            answered += len(recs)
            bar.update(len(recs))
            bar.set_postfix_str(f"{answered / max(time.perf_counter() - t_start, 1e-9):,.1f} samples/s")
    finally:
        bar.close()
    return provenance
