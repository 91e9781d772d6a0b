"""`cultengine bench`: load rows, run them through the engine in batches, write the run directory.

A run directory is resumable, and never with stale results: its `config.json` names the command's
identity (model path and content identity, data files and their sha256, suite, scoring, template);
re-running with another model, suite or template is refused (`--overwrite` starts afresh), and a stored
result is reused only when its row's `input_hash` is unchanged (an edited answer, option or image
recomputes that row). One process at a time owns a run directory (or a shard of it): a lock file holds
the owner's pid.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import IO, Any

from .. import console, provenance, runlog
from . import answer, data, distributed, formats, judge, langgap, metrics, report, results
from .suites import (
    SuiteConfig,
    input_hash,
    usable,
)

# the judge is not part of it: judging can be added to (or redone for) a finished run of answers
FINGERPRINT = (
    "model",
    "model_identity",
    "data",
    "format",
    "suite",
    "scoring",
    "circular",
    "template",
    "cvqa_lang",
    "mc_prompt",
    "columns",
    "split",
)
STATS = "engine_stats.jsonl"
# What --overwrite removes: the files a run writes (nothing else in the directory is touched).
RUN_FILES = ("config.json", "summary.json", "report.md", "report.html", "predictions.json", STATS)


class RunError(ValueError):
    """A bench run that cannot start: bad flags, a busy or unusable run directory, a changed command."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _default_device() -> str:
    return console.default_device(None)


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _default_engine(model: str, device: str, dtype: str, threads: int | None = None, tensor_parallel_size: int = 1):
    from ..engine import Engine

    return Engine(
        model,
        device=device,
        dtype=dtype,
        enable_prefix_caching=True,
        threads=threads,
        tensor_parallel_size=tensor_parallel_size,
    )


def _check_args(args) -> None:
    """Flags that would fail only later (after the model loaded) fail here."""
    if not isinstance(args.batch, int) or args.batch < 1:
        raise RunError(f"--batch must be a positive number of samples, got {args.batch}")
    if args.limit is not None and args.limit < 1:
        raise RunError(f"--limit must be a positive number of rows, got {args.limit}")
    if args.template and not Path(args.template).is_file():
        raise RunError(f"--template {args.template}: no such file")
    if getattr(args, "ray_replicas", None):
        if args.shard:
            raise RunError("--ray-replicas shares the samples among Ray replicas itself: drop --shard")
        try:
            import ray.data  # noqa: F401
        except ImportError:
            raise RunError("--ray-replicas needs Ray Data: pip install 'ray[data]'") from None
    try:
        files = formats.expand(args.data or [], getattr(args, "split", None))
    except FileNotFoundError as e:
        raise RunError(f"--data: {e}") from None
    for p in files:
        if not p.is_file():
            raise RunError(f"--data {p}: {'not a file' if p.exists() else 'no such file'}")
    if args.image_root and not Path(args.image_root).is_dir():
        raise RunError(f"--image-root {args.image_root}: no such directory")


def _model_config(model: Path) -> dict:
    """config.json of the checkpoint directory, checked before anything is loaded."""
    if not model.is_dir():
        raise RunError(f"--model {model}: no such checkpoint directory")
    try:
        cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"--model {model}: not a checkpoint (no config.json)") from None
    except (ValueError, OSError) as e:
        raise RunError(f"--model {model}: config.json is unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise RunError(f"--model {model}: config.json is not a JSON object")
    return cfg


def model_identity(model: Path) -> str:
    """What makes the checkpoint what it is, without reading its weights: the small files' content
    (config, tokenizer, templates) and each weight file's name, size and modification time."""
    h = hashlib.sha256()
    for p in sorted(model.iterdir()):
        if not p.is_file():
            continue
        st = p.stat()
        if p.suffix in (".json", ".jinja", ".txt", ".model") and st.st_size < 64 << 20:
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        else:
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _open_run_dir(run_dir: Path, shard: tuple[int, int] | None) -> IO[str]:
    """Create the run directory and take its lock (one per shard); the lock file holds our pid."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file, not a directory")
    name = ".lock" if shard is None or shard[1] == 1 else f".lock.shard-{shard[0]}-of-{shard[1]}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = (run_dir / name).open("a+", encoding="utf-8")
    except OSError as e:
        raise RunError(f"--out {run_dir} is not writable: {e.strerror or e}") from None
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): run unlocked
        pass
    except OSError as e:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise RunError(
                f"--out {run_dir} is in use by process {owner} (another cultengine bench); "
                "wait for it to finish or use another --out"
            ) from None
        raise
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except OSError as e:
        lock.close()
        raise RunError(f"--out {run_dir} is not writable: {e.strerror or e}") from None
    return lock


def _discard(run_dir: Path) -> None:
    """--overwrite: remove what an earlier run wrote, so this one starts afresh."""
    for p in [*results.result_files(run_dir), *(run_dir / n for n in RUN_FILES)]:
        p.unlink(missing_ok=True)


def _check_config(run_dir: Path, config: dict) -> None:
    """Resuming into a directory made by a different command would mix results: refuse. (Without results
    there is nothing to mix: a run that failed before its first result leaves nothing to protect.)"""
    f = run_dir / "config.json"
    if not f.exists() or not results.result_files(run_dir):
        return
    try:
        old = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        old = {}
    diff = [k for k in FINGERPRINT if old.get(k) != config.get(k)]
    if diff:
        if "model" in diff:  # another checkpoint: that its files differ goes without saying
            diff = [k for k in diff if k != "model_identity"]
        what = ", ".join("model (its files changed)" if k == "model_identity" else k for k in diff)
        raise RunError(
            f"{run_dir} holds a run with a different {what}; rerun with --overwrite to discard "
            "its results and start fresh, or use another --out"
        )
    if old.get("data_sha256") != config.get("data_sha256"):
        _log(
            "note: the data files changed since this run directory was last used; results of changed rows "
            "are recomputed"
        )


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
    keep = (
        "prefill_tokens_computed",
        "prompt_tokens",
        "generated_tokens",
        "images_encoded",
        "num_preemptions",
        "run_seconds",
    )
    return {
        "sessions": len(last),
        "prefix_cache_hit_rate": round(hit / q, 4) if q else None,
        "prefill_tokens_saved": int(hit),
        **{k: tot[k] for k in keep if k in tot},
    }


# The run section's facts about what computed the results: kept from the run that did when a rerun computes nothing.
RUN_FACTS = ("command", "date", "machine", "libraries", "image_processor", "image_backend", "engine_settings")


def _logged_provenance(run_dir: Path) -> dict | None:
    """The provenance of the last engine session that computed results in this run directory (stats log)."""
    found = None
    for rec in runlog.read(run_dir / STATS):
        found = rec.get("provenance", found)
    return found


def _run_section(run_dir: Path, config: dict, engine_provenance: dict | None) -> dict:
    """The summary's provenance: this invocation's engine, else the run that computed the results (its summary
    and stats log), merged so that a rerun with nothing to do never drops what the earlier run recorded."""
    section = provenance.collect(config["model"], config["data"], engine_provenance or _logged_provenance(run_dir))
    if engine_provenance is not None:
        return section
    try:
        old = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("run") or {}
    except (OSError, ValueError, AttributeError):
        old = {}
    for key in RUN_FACTS:
        if old.get(key) is not None:
            section[key] = old[key]
    return section


def _evaluate(batches, writer: runlog.ResultLog, done: int, total: int, stats_file: Path, quiet: bool = False):
    """Write each batch's records as it comes (from `answer.answer_locally` or Ray replicas) and what its engine
    reported; returns the first engine provenance reported."""
    bar = console.bar(total, initial=done, unit="sample", desc="bench", quiet=quiet)
    t_start, tokens, first = time.perf_counter(), {}, None
    try:
        for recs, reports in batches:
            writer.write(recs)
            for r in reports:  # one line per engine session: counters, and first what ran (a rerun's summary)
                answer.log_stats(stats_file, r["session"], r["stats"], r["provenance"])
                first = first or r["provenance"]
                tokens[r["session"]] = r["stats"].get("prompt_tokens", 0) + r["stats"].get("generated_tokens", 0)
            bar.update(len(recs))
            bar.set_postfix_str(f"{sum(tokens.values()) / max(time.perf_counter() - t_start, 1e-9):,.0f} tok/s")
    finally:  # a failing batch leaves the bar on its own line, before the error
        bar.close()
    return first


def _finalize(
    run_dir: Path,
    rows: list[data.Row],
    skipped: list[data.Skipped],
    cfg: SuiteConfig,
    config: dict,
    demo: bool,
    expected: dict[str, str],
    dropped: dict[str, int],
    extra: list[dict] = (),
    engine_provenance: dict | None = None,
) -> Path:
    recs = results.merge(run_dir, [r.id for r in rows], extra, expected)
    if judge.attach(run_dir, recs):  # the judge's verdicts join each sample's result line
        runlog.atomic_write(run_dir / results.RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    summary = {"config": config, "demo": demo, **metrics.summarize(recs, [asdict(s) for s in skipped], cfg.suite)}
    summary["samples"]["missing_images"] = sum(s.reason.startswith("missing image") for s in skipped)
    if any("judge_correct" in r for r in recs):
        summary["primary_metric"] = "judge_acc"
        summary["judge"] = judge.agreement(recs)
    summary["language_gap"] = langgap.language_gap(
        [r for r in recs if not r.get("error")], cfg.suite, summary["primary_metric"]
    )
    for name, preds in formats.submissions(rows, recs).items():  # CVQA leaderboard files
        runlog.atomic_write(run_dir / name, json.dumps(preds, ensure_ascii=False, indent=1))
    summary["run"] = {
        "engine": _engine_totals(run_dir),
        "stored_results_dropped": dict(dropped),
        **_run_section(run_dir, config, engine_provenance),
    }
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
    from ..paths import cache_dir
    from . import default
    from .demo_checkpoint import resolve

    _check_args(args)
    shard = distributed.parse_shard(args.shard) if args.shard else None
    model = resolve(args.model)
    model_cfg = _model_config(model)
    device = args.device or _default_device()
    dist = distributed.from_env(device)
    shard = dist.shard if dist else shard
    if dist and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
    lead = dist is None or dist.rank == 0

    data_paths = args.data or [str(default.build(cache_dir() / f"default-bench-v{default.VERSION}"))]
    demo = bool(model_cfg.get("cultengine_demo"))
    cfg = SuiteConfig.from_args(args.suite, args.scoring, args.circular, args.template)
    name = f"{model.name}-{Path(data_paths[0]).stem}-{cfg.suite}-{cfg.scoring}" + ("-circular" * cfg.circular)
    run_dir = Path(args.output_dir or Path("cultengine-runs") / name)
    lock = _open_run_dir(run_dir, shard)
    console.resumable(run_dir)
    try:
        return _run_locked(args, make_engine, run_dir, model, data_paths, demo, cfg, device, dist, shard, lead)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # what is written so far is kept (fsync'd)
            raise RunError(
                f"cannot write to --out {run_dir}: {e.strerror}; the results written so far "
                "are kept and a re-run resumes"
            ) from e
        raise
    finally:
        lock.close()


def _run_locked(
    args,
    make_engine,
    run_dir: Path,
    model: Path,
    data_paths: list[str],
    demo: bool,
    cfg: SuiteConfig,
    device: str,
    dist,
    shard: tuple[int, int] | None,
    lead: bool,
) -> int:
    if args.overwrite and lead:
        _discard(run_dir)
    opts = formats.ImportOptions.from_args(args, cfg.suite == "vqa")
    config = {
        "model": str(model.resolve()),
        "model_name": model.name,
        "model_identity": model_identity(model),
        "data": [str(Path(p).resolve()) for p in data_paths],
        "data_sha256": [_file_sha256(p) for p in formats.expand(data_paths, opts.split)],
        "format": args.format,
        "suite": cfg.suite,
        "scoring": cfg.scoring,
        "circular": cfg.circular,
        "template": cfg.template,
        "limit": args.limit,
        "device": device,
        "dtype": args.dtype,
        "batch": args.batch,
        "shard": list(shard) if shard else None,
        "image_root": args.image_root,
        "allow_absolute_image_paths": args.allow_absolute_image_paths,
        "min_cell_n": getattr(args, "min_cell_n", 10),
    }
    judge_model = getattr(args, "judge_model", None)
    if judge_model and cfg.suite != "vqa":
        raise RunError("--judge-model judges open answers: use it with --suite vqa")
    for k in ("cvqa_lang", "mc_prompt", "columns", "split", "judge_prompt"):
        config[k] = getattr(args, k, None)
    config["judge_model"] = str(Path(judge_model).resolve()) if judge_model else None
    _check_config(run_dir, config)
    ds = data.load(data_paths, args.format, opts=opts)
    rows = ds.rows[: args.limit] if args.limit else ds.rows
    skipped = list(ds.skipped)
    for r in list(rows):
        if why := usable(r, cfg):
            skipped.append(data.Skipped(ds.files[0], r.line, r.id, why))
    unfit = skipped[len(ds.skipped) :]
    if rows and len(unfit) == len(rows):  # refused before the model loads
        raise RunError(
            f"--suite {cfg.suite} does not fit this data: none of its {len(rows)} rows can run in it "
            f"({unfit[0].reason})"
        )
    bad = {s.id for s in unfit}
    rows = [r for r in rows if r.id not in bad]
    if lead:
        runlog.write_json(run_dir / "config.json", config)
    if lead:
        for s in skipped[:20]:
            _log(f"skipped {s}")
        if len(skipped) > 20:
            _log(f"... and {len(skipped) - 20} more skipped rows")

    # Rows sharing an image run next to each other so the prefix cache serves the image tokens.
    ordered = [r for _, r in sorted(enumerate(rows), key=lambda t: (t[1].image_key(), t[0]))]
    mine = distributed.shard_slice(ordered, shard)
    expected = {r.id: input_hash(r, cfg) for r in rows}
    stored = results.read_valid(run_dir, expected)
    if stored.dropped and lead:
        _log(f"dropped stored results: {stored.summary()} (they are recomputed or no longer in the data)")
    todo = [r for r in mine if r.id not in stored.records]
    console.resume_note(len(mine) - len(todo), len(mine), "samples")
    threads = getattr(args, "threads", None)
    tp = getattr(args, "tensor_parallel_size", 1)
    make_engine = make_engine or (lambda m, d, t: _default_engine(m, d, t, threads, tp))
    engine_provenance = None
    replicas = getattr(args, "ray_replicas", None)
    if todo:
        engine = None
        if replicas:  # Ray actors answer; this process writes
            from ..replicas import Replicas

            kwargs = dict(device=device, dtype=args.dtype, threads=threads, tensor_parallel_size=tp)
            pool = Replicas(str(model), kwargs, replicas, getattr(args, "ray_address", None))
            batches = pool.map(todo, partial(answer.evaluate_chunk, cfg=cfg), args.batch)
        else:
            engine = make_engine(str(model), device, args.dtype)
            batches = answer.answer_locally(engine, todo, cfg, args.batch)
        writer = runlog.ResultLog(results.shard_file(run_dir, shard))
        try:
            done = len(mine) - len(todo)
            engine_provenance = _evaluate(
                batches, writer, done, len(mine), run_dir / STATS, getattr(args, "quiet", False)
            )
        finally:
            writer.close()
        if engine is not None:
            if hasattr(engine, "close"):
                engine.close()  # tensor-parallel workers stop, so a judge can form its own group
            del engine  # the judge (if any) loads after the answers: free the memory first
            _free_memory(device)

    def judge_all() -> None:
        if judge_model:
            prompt = judge.JudgePrompt.load(config["judge_prompt"])
            judge.run_judge(
                run_dir,
                rows,
                results.read_valid(run_dir, expected).records,
                judge_model,
                lambda: make_engine(judge_model, device, args.dtype),
                prompt,
                args.batch,
            )

    if dist:
        mine_ids = {r.id for r in mine}
        own = [rec for i, rec in results.read_valid(run_dir, expected).records.items() if i in mine_ids]
        gathered = dist.gather(own)
        if lead:
            judge_all()
            out = _finalize(
                run_dir,
                rows,
                skipped,
                cfg,
                config,
                demo,
                expected,
                stored.dropped,
                [x for g in gathered for x in g],
                engine_provenance,
            )
        dist.barrier()
        dist.close()
        if not lead:
            return 0
    else:
        have = results.read_valid(run_dir, expected).records
        missing = sum(r.id not in have for r in rows)
        if missing:
            _log(
                f"shard {args.shard} done; {missing} of {len(rows)} samples still to run in other shards. "
                f"The summary is written by whichever shard (or unsharded run) finishes last."
            )
            return 0
        judge_all()
        out = _finalize(
            run_dir, rows, skipped, cfg, config, demo, expected, stored.dropped, engine_provenance=engine_provenance
        )
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    m = summary["primary_metric"]
    overall = summary["overall"]
    if overall.get(m) is not None:
        lo, hi = overall.get(f"{m}_ci") or (overall[m], overall[m])
        print(
            f"{m} = {100 * overall[m]:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}) over {overall['n']} samples "
            f"({summary['samples']['skipped']} skipped)"
        )
    if demo:
        print(f"note: {report.CHANCE_NOTE}")
    print(f"report: {out.resolve()}")
    print(f"summary: {(run_dir / 'summary.json').resolve()}")
    return 0
