"""`cultengine bench`: load rows, run them through the engine in batches, write the run directory."""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import provenance, runlog
from . import data, distributed, formats, judge, langgap, metrics, report, results
from .suites import LONG_MAX_TOKENS, MAX_TOKENS, SuiteConfig, build_requests, long_answer, prompt_hash, score, usable

# the judge is not part of it: judging can be added to (or redone for) a finished run of answers
FINGERPRINT = ("model", "data", "format", "suite", "scoring", "circular", "template", "cvqa_lang", "mc_prompt",
               "columns", "split")
STATS = "engine_stats.jsonl"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _default_engine(model: str, device: str, dtype: str):
    from ..engine import Engine

    return Engine(model, device=device, dtype=dtype, enable_prefix_caching=True)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_config(run_dir: Path, config: dict) -> None:
    """Resuming into a directory made by a different command would mix results: refuse."""
    f = run_dir / "config.json"
    if not f.exists():
        return
    old = json.loads(f.read_text(encoding="utf-8"))
    diff = [k for k in FINGERPRINT if old.get(k) != config.get(k)]
    if diff:
        raise SystemExit(f"error: {run_dir} holds a run with different {', '.join(diff)}; "
                         "use another --output-dir (or delete it) to start a new run")


def _record(row: data.Row, cfg: SuiteConfig, outs: list, batch_s: float, n: int) -> dict:
    rec = {"id": row.id, "prompt_hash": prompt_hash(row, cfg), **score(row, cfg, outs)}
    if "prompt_lang" in row.meta:  # --cvqa-lang both: the English-vs-local gap needs it
        rec["prompt_lang"] = row.meta["prompt_lang"]
    rec.update(groups=row.groups(), western=row.western, cluster=row.image_key()[:16] or row.id,
               chance=metrics.chance(len(row.options), cfg.circular) if cfg.suite == "mcq" else None,
               timings={"batch_s": round(batch_s, 4), "sample_s": round(batch_s / n, 5)})
    return rec


def _engine_totals(run_dir: Path) -> dict[str, Any]:
    """Sum the last stats line of every engine session (resumes and ranks) of this run."""
    last: dict[str, dict] = {}
    for rec in runlog.read(run_dir / STATS):
        last[rec["session"]] = rec["stats"]
    tot: dict[str, float] = {}
    for st in last.values():
        for k, v in st.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                tot[k] = tot.get(k, 0) + v
    q, hit = tot.get("prefix_cache_queried_tokens", 0), tot.get("prefix_cache_hit_tokens", 0)
    keep = ("prefill_tokens_computed", "prompt_tokens", "generated_tokens", "images_encoded",
            "num_preemptions", "run_seconds")
    return {"sessions": len(last), "prefix_cache_hit_rate": round(hit / q, 4) if q else None,
            "prefill_tokens_saved": int(hit), **{k: tot[k] for k in keep if k in tot}}


def _evaluate(engine, rows: list[data.Row], cfg: SuiteConfig, writer: runlog.ResultLog, batch: int,
              done: int, total: int, stats_file: Path) -> None:
    from tqdm import tqdm

    from ..sampling import SamplingParams

    session = uuid.uuid4().hex
    params = {False: SamplingParams(max_tokens=MAX_TOKENS[cfg.suite], temperature=0.0, stop=["\n"]),
              True: SamplingParams(max_tokens=LONG_MAX_TOKENS, temperature=0.0)}  # by long_answer(row)
    bar = tqdm(total=total, initial=done, unit="sample", dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        reqs = [build_requests(r, cfg) for r in chunk]
        flat = [q for rs in reqs for q in rs]
        t0 = time.perf_counter()
        outs = (engine.score(flat, use_tqdm=False) if cfg.scoring == "loglik"
                else engine.generate(flat, [params[long_answer(r, cfg.suite)] for r, rs in zip(chunk, reqs, strict=True)
                                            for _ in rs], use_tqdm=False))
        dt = time.perf_counter() - t0
        recs, k = [], 0
        for row, rs in zip(chunk, reqs, strict=True):
            recs.append(_record(row, cfg, outs[k:k + len(rs)], dt, len(chunk)))
            k += len(rs)
        writer.write(recs)
        stats = engine.stats()
        with stats_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"session": session, "stats": stats}) + "\n")
        tokens = stats.get("prompt_tokens", 0) + stats.get("generated_tokens", 0)
        bar.update(len(chunk))
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t_start, 1e-9):,.0f} tok/s")
    bar.close()


def _finalize(run_dir: Path, rows: list[data.Row], skipped: list[data.Skipped], cfg: SuiteConfig,
              config: dict, demo: bool, extra: list[dict] = (), engine_provenance: dict | None = None) -> Path:
    recs = results.merge(run_dir, [r.id for r in rows], extra)
    if judge.attach(run_dir, recs):  # the judge's verdicts join each sample's result line
        runlog.atomic_write(run_dir / results.RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                               for r in recs))
    summary = {"config": config, "demo": demo,
               **metrics.summarize(recs, [asdict(s) for s in skipped], cfg.suite)}
    summary["samples"]["missing_images"] = sum(s.reason.startswith("missing image") for s in skipped)
    if any("judge_correct" in r for r in recs):
        summary["primary_metric"] = "judge_acc"
        summary["judge"] = judge.agreement(recs)
    summary["language_gap"] = langgap.language_gap([r for r in recs if not r.get("error")], cfg.suite,
                                               summary["primary_metric"])
    for name, preds in formats.submissions(rows, recs).items():  # CVQA leaderboard files
        runlog.atomic_write(run_dir / name, json.dumps(preds, ensure_ascii=False, indent=1))
    summary["run"] = {"engine": _engine_totals(run_dir),
                      **provenance.collect(config["model"], config["data"], engine_provenance)}
    if demo:
        summary["note_demo"] = report.CHANCE_NOTE
    if summary["samples"]["unlabeled"]:
        preds = {r["id"]: r.get("pred_index", r.get("prediction")) for r in recs if r.get("correct") is None}
        runlog.atomic_write(run_dir / "predictions.json", json.dumps(preds, ensure_ascii=False, indent=1))
    runlog.write_json(run_dir / "summary.json", summary)
    runlog.atomic_write(run_dir / "report.md", report.markdown(summary))
    runlog.atomic_write(run_dir / "report.html", report.html_report(summary))
    return run_dir / "report.html"


def run(args, make_engine=None) -> int:
    """`make_engine(model, device, dtype)` replaces the Engine in tests."""
    from . import default
    from .demo_checkpoint import cache_dir, resolve

    device = args.device or _default_device()
    dist = distributed.from_env(device)
    shard = dist.shard if dist else (distributed.parse_shard(args.shard) if args.shard else None)
    if dist and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
    lead = dist is None or dist.rank == 0

    model = resolve(args.model)
    data_paths = args.data or [str(default.build(cache_dir() / f"default-bench-v{default.VERSION}"))]
    model_cfg = json.loads((model / "config.json").read_text(encoding="utf-8")) if model.is_dir() else {}
    demo = bool(model_cfg.get("cultengine_demo"))
    cfg = SuiteConfig.from_args(args.suite, args.scoring, args.circular, args.template)
    name = f"{model.name}-{Path(data_paths[0]).stem}-{cfg.suite}-{cfg.scoring}" + ("-circular" * cfg.circular)
    run_dir = Path(args.output_dir or Path("cultengine-runs") / name)
    config = {"model": str(model.resolve()), "model_name": model.name,
              "data": [str(Path(p).resolve()) for p in data_paths], "format": args.format,
              "suite": cfg.suite, "scoring": cfg.scoring, "circular": cfg.circular, "template": cfg.template,
              "limit": args.limit, "device": device, "dtype": args.dtype, "batch": args.batch,
              "shard": list(shard) if shard else None, "min_cell_n": getattr(args, "min_cell_n", 10)}
    judge_model = getattr(args, "judge_model", None)
    if judge_model and cfg.suite != "vqa":
        raise SystemExit("error: --judge-model judges open answers: use it with --suite vqa")
    for k in ("cvqa_lang", "mc_prompt", "columns", "split", "judge_prompt"):
        config[k] = getattr(args, k, None)
    config["judge_model"] = str(Path(judge_model).resolve()) if judge_model else None
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config(run_dir, config)
    if lead:
        runlog.write_json(run_dir / "config.json", config)
    if demo and lead:
        _log(f"note: {report.CHANCE_NOTE}")

    ds = data.load(data_paths, args.format, opts=formats.ImportOptions.from_args(args, cfg.suite == "vqa"))
    rows = ds.rows[: args.limit] if args.limit else ds.rows
    skipped = list(ds.skipped)
    for r in list(rows):
        if why := usable(r, cfg):
            skipped.append(data.Skipped(ds.files[0], r.line, r.id, why))
    bad = {s.id for s in skipped[len(ds.skipped):]}
    rows = [r for r in rows if r.id not in bad]
    if lead:
        for s in skipped[:20]:
            _log(f"skipped {s}")
        if len(skipped) > 20:
            _log(f"... and {len(skipped) - 20} more skipped rows")

    # Rows sharing an image run next to each other so the prefix cache serves the image tokens.
    ordered = [r for _, r in sorted(enumerate(rows), key=lambda t: (t[1].image_key(), t[0]))]
    mine = distributed.shard_slice(ordered, shard)
    finished = results.read_all(run_dir)
    todo = [r for r in mine if r.id not in finished]
    make_engine = make_engine or _default_engine
    engine_provenance = None
    if todo:
        engine = make_engine(str(model), device, args.dtype)
        writer = runlog.ResultLog(results.shard_file(run_dir, shard))
        try:
            done = len(mine) - len(todo)
            _evaluate(engine, todo, cfg, writer, args.batch, done, len(mine), run_dir / STATS)
        finally:
            writer.close()
        engine_provenance = engine.provenance() if hasattr(engine, "provenance") else None
        del engine  # the judge (if any) loads after the answers: free the memory first
        _free_memory(device)

    def judge_all() -> None:
        if judge_model:
            prompt = judge.JudgePrompt.load(config["judge_prompt"])
            judge.run_judge(run_dir, rows, results.read_all(run_dir), judge_model,
                            lambda: make_engine(judge_model, device, args.dtype), prompt, args.batch)

    if dist:
        mine_ids = {r.id for r in mine}
        own = [rec for i, rec in results.read_all(run_dir).items() if i in mine_ids]
        gathered = dist.gather(own)
        if lead:
            judge_all()
            out = _finalize(run_dir, rows, skipped, cfg, config, demo, [x for g in gathered for x in g],
                            engine_provenance)
        dist.barrier()
        dist.close()
        if not lead:
            return 0
    else:
        have = results.read_all(run_dir)
        missing = sum(r.id not in have for r in rows)
        if missing:
            _log(f"shard {args.shard} done; {missing} of {len(rows)} samples still to run in other shards. "
                 f"The summary is written by whichever shard (or unsharded run) finishes last.")
            return 0
        judge_all()
        out = _finalize(run_dir, rows, skipped, cfg, config, demo, engine_provenance=engine_provenance)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    m = summary["primary_metric"]
    overall = summary["overall"]
    if overall.get(m) is not None:
        lo, hi = overall.get(f"{m}_ci") or (overall[m], overall[m])
        print(f"{m} = {100 * overall[m]:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}) over {overall['n']} samples "
              f"({summary['samples']['skipped']} skipped)")
    if demo:
        print(f"note: {report.CHANCE_NOTE}")
    print(f"report: {out.resolve()}")
    print(f"summary: {(run_dir / 'summary.json').resolve()}")
    return 0
