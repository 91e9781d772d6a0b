"""`cultengine bench` and `cultengine data {validate,convert,sample}`."""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..console import add_out, add_quiet, add_ray, add_tensor_parallel, add_threads, bar, positive_int
from . import importers

if TYPE_CHECKING:  # the importers are loaded by the commands, so that --help loads neither them nor torch
    from . import data

OUT_FILE_HELP = "output file: OUT.jsonl (images copied to OUT_images/) or OUT.parquet (images embedded)"
FORMATS = ("auto", *importers.NAMES)

BENCH_EPILOG = """\
With no arguments, runs the embedded default benchmark (flags drawn by code, capital/currency
questions) on a small demo checkpoint with random weights, both built on first use under
$CULTENGINE_CACHE (default ~/.cache/cultengine). The demo's accuracy is chance level: it demonstrates
the pipeline and the engine's throughput.

Run directory: results.jsonl (one line per finished sample, fsync'd), summary.json, report.md,
report.html, config.json. Re-running the same command resumes: finished samples are skipped, unless
their row changed (question, options, answer, groups or an image's content): those are recomputed. A
different model (path or files), suite, scoring or template is refused; --overwrite starts afresh. One
run at a time per directory (and shard). Under torchrun each rank takes its slice and its GPU; rank 0
merges and writes the summary.

Image paths in the data must stay inside the data file's folder (or --image-root); absolute paths and
paths leading out of it need --allow-absolute-image-paths, otherwise their rows are skipped.
"""


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a cultural benchmark and write a report",
        description="Evaluate a vision-language model on cultural benchmark files.",
        epilog=BENCH_EPILOG,
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        action="append",
        help="local checkpoint directory (Hugging Face layout); default: the built-in demo checkpoint "
        "(random weights). Repeat it to run several models one after another into one parent folder "
        "(--out), finished by their comparison (as `cultengine compare`)",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        nargs="+",
        help="benchmark files or folders: canonical JSONL/parquet, "
        "VLMEvalKit TSV, CVQA, ALM-Bench, WorldCuisines, SEA-VQA, BLEnD, CulturalVQA; Hugging Face "
        "dataset folders (parquet shards, save_to_disk) or OWNER/NAME from the local hub cache; "
        "default: the embedded benchmark",
    )
    p.add_argument(
        "--suite",
        choices=("mcq", "vqa"),
        default="mcq",
        help="mcq: multiple choice; vqa: open answers scored by exact match / containment",
    )
    add_out(
        p,
        "run directory (default: cultengine-runs/<model>-<data>-<suite>-<scoring>)",
        "--output-dir",
        dest="output_dir",
        metavar="DIR",
    )
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate only the first N rows")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), help="where the model runs (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and activations dtype (auto: the checkpoint's)",
    )
    p.add_argument(
        "--scoring",
        choices=("loglik", "generate"),
        default="loglik",
        help="mcq: score each option's log-likelihood (acc, acc_norm), or generate a letter and parse it",
    )
    p.add_argument(
        "--circular",
        action="store_true",
        help="mcq: ask every rotation of the options; right only if all rotations are",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=128,
        metavar="N",
        help="samples per engine call; results are flushed after each (default 128)",
    )
    p.add_argument(
        "--shard", metavar="I/N", help="run slice I of N (0-based); the last shard to finish writes the summary"
    )
    add_ray(p)
    p.add_argument(
        "--format", choices=FORMATS, default="auto", help="importer for --data (auto: by extension and columns)"
    )
    _import_args(p)
    add_threads(p)
    add_tensor_parallel(p)
    add_quiet(p)
    p.add_argument(
        "--template",
        metavar="FILE",
        help="Jinja template for the user turn text (variables: "
        "question, hint, options, letters, country, language, category)",
    )
    p.add_argument(
        "--judge-model",
        metavar="DIR",
        help="vqa: judge each open answer with this checkpoint "
        "(P(yes) of 'yes'/'no' by Engine.score), after the answers are generated",
    )
    p.add_argument(
        "--judge-prompt",
        metavar="FILE",
        help="Jinja judging prompt (variables: question, answers, "
        "prediction, country, language); default: the package's bench/prompts/judge.jinja",
    )
    p.add_argument(
        "--min-cell-n",
        type=int,
        default=10,
        metavar="N",
        help="report: groups and heatmap cells with fewer samples are greyed (default 10)",
    )
    p.add_argument("--overwrite", action="store_true", help="discard the results already in --out and start afresh")
    _image_args(p)
    p.set_defaults(func=_bench)


def _import_args(p: argparse.ArgumentParser) -> None:
    """The importer flags shared by `cultengine bench` and `cultengine data ...`."""
    p.add_argument(
        "--cvqa-lang",
        "--question-lang",
        choices=("local", "en", "both"),
        default="local",
        help="bilingual benchmarks (CVQA, ALM-Bench, BLEnD short answer): ask the local-language "
        "question, the English one, or both (the English-vs-local gap per country)",
    )
    p.add_argument(
        "--mc-prompt",
        choices=("parsed", "as-given"),
        default="parsed",
        help="prompts that list their own options (WorldCuisines, BLEnD): parse the options out, "
        "or ask the prompt verbatim with its option labels as the choices",
    )
    p.add_argument(
        "--columns",
        metavar="FIELD=COL,...",
        help="map any table's columns onto the canonical "
        "fields, e.g. question=Q,options=Options,answer=Label,country=Country,image=img "
        "(options=A+B+C+D joins option columns)",
    )
    p.add_argument("--split", metavar="NAME", help="dataset folders: read only this split (e.g. test)")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-root",
        metavar="DIR",
        help="folder that relative image paths resolve under (default: each data file's folder), "
        "and where images named by URL are found (by the URL's file name or its sha1/md5/sha256 hex "
        "digest); nothing is downloaded",
    )
    p.add_argument(
        "--allow-absolute-image-paths",
        action="store_true",
        help="trust the data's image paths: absolute ones, and relative ones leading out of the folder",
    )


def _bench(args) -> int:
    from .run import run

    if args.model and len(args.model) > 1:
        from ..compare import bench_many

        return bench_many(args, run)
    args.model = args.model[0] if args.model else None
    return run(args)


def _data_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="validate, convert or sample benchmark files",
        description="Validate, convert or sample benchmark files (any format `cultengine bench` reads).",
    )
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    files_help = "benchmark files or folders (any format --data of `cultengine bench` reads)"
    v = dsub.add_parser("validate", help="load files, report bad rows and counts; exit 1 if any row is bad")
    v.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    v.add_argument("--format", choices=FORMATS, default="auto", help="importer (auto: by extension and columns)")
    _import_args(v)
    _image_args(v)
    v.set_defaults(func=_validate)
    c = dsub.add_parser(
        "convert",
        help="write files as canonical JSONL (images beside it) or parquet "
        "(images embedded), chosen by the output's extension",
    )
    c.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    add_out(c, OUT_FILE_HELP, "--output", short=True, required=True, dest="output", metavar="OUT")
    c.add_argument("--format", choices=FORMATS, default="auto", help="importer (auto: by extension and columns)")
    _import_args(c)
    _image_args(c)
    add_quiet(c)
    c.set_defaults(func=_convert)
    s = dsub.add_parser("sample", help="write a random subset (canonical form)")
    s.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    add_out(s, OUT_FILE_HELP, "--output", short=True, required=True, dest="output", metavar="OUT")
    s.add_argument("-n", type=positive_int, required=True, help="rows to keep")
    s.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    s.add_argument("--format", choices=FORMATS, default="auto", help="importer (auto: by extension and columns)")
    _import_args(s)
    _image_args(s)
    add_quiet(s)
    s.set_defaults(func=_sample)


def _load(args) -> data.Dataset:
    from . import data, formats

    ds = data.load(args.files, args.format, opts=formats.ImportOptions.from_args(args))
    for s in ds.skipped:
        print(f"skipped {s}", file=sys.stderr)
    return ds


def _validate(args) -> int:
    ds = _load(args)
    print(f"{len(ds.rows)} rows ok, {len(ds.skipped)} skipped")
    labeled = sum(r.labeled for r in ds.rows)
    mcq = sum(bool(r.options) for r in ds.rows)
    print(f"  multiple choice: {mcq}, open: {len(ds.rows) - mcq}, labeled: {labeled}")
    for file, columns in ds.columns.items():  # how each column was read
        if [c for c, _ in columns] == ["*"]:
            print(f"  {Path(file).name}: {columns[0][1]}")
            continue
        print(f"  columns of {Path(file).name}:")
        for column, how in columns:
            print(f"    {column} -> {how}")
    for key in ("country", "continent", "category", "question_type", "language"):
        counts = Counter(getattr(r, key) or "unknown" for r in ds.rows)
        print(
            f"  {key}: "
            + ", ".join(f"{k} {n}" for k, n in counts.most_common(8))
            + (f", ... ({len(counts)} values)" if len(counts) > 8 else "")
        )
    unknown = sorted({r.country for r in ds.rows if r.country and not r.region})
    if unknown:
        print(f"  countries not in the table (no region): {', '.join(unknown[:20])}")
    if ds.skipped:
        reasons = Counter(_reason_kind(s.reason) for s in ds.skipped)
        print("  skipped by reason: " + "; ".join(f"{k} ({n})" for k, n in reasons.most_common()))
    from .suites import SuiteConfig, usable

    for cfg in (SuiteConfig("mcq"), SuiteConfig("vqa")):
        why = Counter(w for r in ds.rows if (w := usable(r, cfg)))
        if why:
            print(
                f"  --suite {cfg.suite} would skip {sum(why.values())}: "
                + "; ".join(f"{k} ({n})" for k, n in why.most_common())
            )
    return 1 if ds.skipped else 0


def _reason_kind(reason: str) -> str:
    """A skip reason without the row's own values (paths, URLs, quoted text, numbers), for counting."""
    reason = re.sub(r"[\w.~:-]*[/\\][\w./\\~%:?=&-]{2,}|'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\d+", "…", reason)
    return re.sub(r"(…\s*)+", "… ", reason).strip()


def _write(rows: list[data.Row], args) -> None:
    """Write `rows` to --output with a progress bar (images are read and copied row by row)."""
    from . import data

    with bar(len(rows), unit="row", desc="writing", quiet=args.quiet, iterable=rows) as progress:
        data.write(progress, args.output)


def _convert(args) -> int:
    ds = _load(args)
    _write(ds.rows, args)
    print(f"wrote {len(ds.rows)} rows to {Path(args.output).resolve()} ({len(ds.skipped)} skipped)")
    return 0


def _sample(args) -> int:
    ds = _load(args)
    rows = random.Random(args.seed).sample(ds.rows, min(args.n, len(ds.rows)))
    _write(rows, args)
    print(f"wrote {len(rows)} of {len(ds.rows)} rows to {Path(args.output).resolve()}")
    return 0


def register(sub) -> None:
    _bench_parser(sub)
    _data_parser(sub)
