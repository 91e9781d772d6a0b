"""`cultengine values | stories | ground | analyze stories` -- one command per study."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..console import (
    add_quiet,
    add_ray,
    add_tensor_parallel,
    add_threads,
    default_device,
    json_safe,
    positive_int,
    print_outputs,
    probability,
    resumable,
    seed,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "values",
        help="cultural value sensitivity (WVS-style), with and without images",
        description="Ask survey items with a country cue, text-only and with each of the country's images; score "
        "the options' log-likelihoods and compare the model's answer distribution with the humans' (Jensen-Shannon "
        "similarity). Writes results.jsonl (one line per scored prompt, resumable), summary.json, report.md/html.",
    )
    _engine_args(p, several_models=True)
    p.add_argument("--items", required=True, help="survey items: id, question, options, topic")
    p.add_argument("--human", required=True, help="human answer distributions: item_id, country, distribution")
    p.add_argument("--images", help="culture-specific images: country, category, image")
    p.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="images the data file names may also lie under DIR, absolute paths included "
        "(default: only inside the data file's folder)",
    )
    p.add_argument(
        "--choices",
        choices=("label", "text"),
        default="label",
        help="score the option numbers (default) or the option texts",
    )
    p.set_defaults(func=_values)

    p = sub.add_parser(
        "stories",
        help="story generation with nationality perturbation",
        description="Generate stories for concepts x images x nationalities x temperatures x samples, the prompt "
        "differing only in the nationality cue. Writes results.jsonl (one line per story, flushed every --batch "
        "stories, resumable), config.json, summary.json; analyse with `cultengine analyze stories`.",
    )
    _engine_args(p)
    p.add_argument("--concepts", required=True, help="comma-separated, or a file with one a line")
    p.add_argument("--images", required=True, nargs="+", help="image files or directories")
    p.add_argument("--nationalities", help="comma-separated demonyms or a file (default: the 42 shipped)")
    p.add_argument("--temperatures", type=_floats, default="0.3,0.7", help="comma-separated sampling temperatures")
    p.add_argument("--samples", type=positive_int, default=1, help="stories per prompt and temperature")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="longest story, in tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep this much probability mass")
    p.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="base seed (a request's seed depends on its image, concept and temperature, not on the nationality)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        metavar="N",
        help="stories per engine call; each call's stories are flushed to results.jsonl when it ends, "
        "so a kill loses at most N (default: 64 on a CPU, where larger calls gain little; --max-num-seqs "
        "on CUDA, where the engine runs that many at once)",
    )
    p.set_defaults(func=_stories)

    p = sub.add_parser(
        "ground",
        help="CulturalGround: template -> refine -> relevance-filter VQA rows",
        description="Build culturally grounded VQA rows from entity records: template questions, reworded by the "
        "model (rewordings that leak the answer are dropped), kept when the model finds the image relevant. "
        "Writes ground.jsonl (every row with its provenance, resumable), ground.parquet (kept rows), summary.json.",
    )
    _engine_args(p)
    p.add_argument("--input", required=True, help="entity records: id, entity, country, properties, image")
    p.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="images the data file names may also lie under DIR, absolute paths included "
        "(default: only inside the data file's folder)",
    )
    p.add_argument("--languages", default="en", help="comma-separated template languages")
    p.add_argument("--templates", help="templates JSON (default: the shipped ground_templates.json)")
    p.add_argument("--threshold", type=probability, default=0.5, help="keep rows with P(yes) >= this")
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=1000,
        help="records per engine call; each chunk's rows are flushed when it ends",
    )
    add_ray(p)
    p.set_defaults(func=_ground)

    p = sub.add_parser("analyze", help="analyse a study's run directory")
    asub = p.add_subparsers(dest="study", required=True)
    a = asub.add_parser("stories", help="lexical, vocabulary, cultural-alignment and CLIP analysis")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of `cultengine stories`")
    a.add_argument(
        "--hofstede",
        help="Hofstede 6-D CSV (ctr,country,Demonym,pdi,...); default: the packaged "
        "copy of Hofstede's published scores",
    )
    a.add_argument(
        "--wvs",
        help="WVS means CSV (ctr,country,Demonym,Q1..Q250); default: the packaged copy of "
        "the World Values Survey means",
    )
    a.add_argument("--wvs-raw", action="store_true", help="do not z-score the WVS columns")
    a.add_argument("--clip", help="CLIPModel checkpoint directory for CLIPScore and retrieval")
    a.add_argument("--device", help="where the CLIP model runs (default: cuda when available, else cpu)")
    a.add_argument("--out", help="output directory (default: the first RUN_DIR)")
    a.add_argument("--top-k", type=positive_int, default=10, help="distinctive terms per nationality")
    a.add_argument("--permutations", type=positive_int, default=9999, help="Mantel test permutations (default 9999)")
    a.set_defaults(func=_analyze_stories)


def _floats(text: str) -> list[float]:
    """argparse type: comma-separated non-negative numbers."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values


def _engine_args(p: argparse.ArgumentParser, several_models: bool = False) -> None:
    help = "checkpoint directory (default 'demo': the built-in demo checkpoint, random weights)"
    if several_models:
        p.add_argument(
            "--model",
            action="append",
            help=help + "; repeat to compare models (e.g. an LLM and its VLM) in one report, each run in its own "
            "subdirectory of --out",
        )
    else:
        p.add_argument("--model", default="demo", help=help)
    p.add_argument("--out", required=True, help="run directory (re-running resumes)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences the engine runs at once")
    add_threads(p)
    add_tensor_parallel(p)
    add_quiet(p)


def _engine_kwargs(args) -> dict:
    return dict(
        device=default_device(args.device),
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        threads=args.threads,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def _replicas(args):
    from ..bench.demo_checkpoint import resolve
    from ..replicas import Replicas

    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError("--ray-replicas needs Ray Data: pip install 'ray[data]'") from None
    return Replicas(str(resolve(args.model)), _engine_kwargs(args), args.ray_replicas, args.ray_address)


def _engine(args, model: str | None = None):
    from .. import Engine
    from ..bench.demo_checkpoint import resolve

    return Engine(resolve(model or args.model), **_engine_kwargs(args))


def _print(summary: dict) -> None:
    print(
        json.dumps(
            json_safe(
                {
                    k: v
                    for k, v in summary.items()
                    if not isinstance(v, list | dict) or k in ("dropped_per_stage", "drop_reasons", "delta_by_category")
                }
            ),
            indent=2,
            default=str,
            allow_nan=False,  # strict JSON: an undefined interval is null
        )
    )


def _outputs(out: str, *names: str) -> None:
    """The closing lines: where each output of the run directory is."""
    print_outputs(*(Path(out) / name for name in names))


def _values(args) -> int:
    from . import values

    resumable(args.out, "results")
    items = values.load_items(args.items)
    human, images = values.load_human(args.human, items), values.load_images(args.images, args.allowed_local_media_path)
    models = args.model or ["demo"]
    runs = []
    for i, model in enumerate(models):
        # One model: its run is --out itself; several: each in its own subdirectory, then compared.
        out = Path(args.out) if len(models) == 1 else Path(args.out) / f"{i + 1:02d}-{Path(model).name}"
        summary = values.run(
            _engine(args, model),
            items,
            human,
            images,
            out,
            choice_format=args.choices,
            model_name=model,
            data_files=[f for f in (args.items, args.human, args.images) if f],
            quiet=args.quiet,
        )
        _print(summary)
        _outputs(out, "results.jsonl", "summary.json", "report.html")
        runs.append(out)
    if len(runs) > 1:
        from .. import compare

        print(f"comparison: {compare.write(compare.compare(runs), args.out).resolve()}")
    return 0


def _stories(args) -> int:
    from . import stories

    resumable(args.out, "stories")
    # the inputs are read and checked before the model loads
    concepts, images = stories.load_list(args.concepts), stories.image_list(args.images)
    nationalities = stories.parse_nationalities(args.nationalities)
    if missing := [i for i in images if not Path(i).is_file()]:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"--images: {missing[0]}: no such image file{more}")
    if not concepts or not images or not nationalities:
        raise ValueError("--concepts, --images and --nationalities must each name at least one")
    summary = stories.run(
        _engine(args),
        concepts,
        images,
        nationalities,
        args.temperatures,
        args.samples,
        args.out,
        max_tokens=args.max_tokens,
        top_p=args.top_p,
        seed=args.seed,
        model_name=args.model,
        batch_size=args.batch or (args.max_num_seqs if default_device(args.device).startswith("cuda") else 64),
        quiet=args.quiet,
    )
    _print(summary)
    _outputs(args.out, "results.jsonl", "summary.json")
    return 0


def _ground(args) -> int:
    from . import ground

    resumable(args.out, "rows")
    templates = ground.load_templates(args.templates)  # the inputs are checked before the model loads
    languages = [s.strip() for s in args.languages.split(",")]
    ground.check_languages(templates, languages)
    if not Path(args.input).is_file():
        raise ValueError(f"--input {args.input}: no such file")
    summary = ground.run(
        _replicas(args) if args.ray_replicas else _engine(args),
        args.input,
        args.out,
        languages,
        templates,
        threshold=args.threshold,
        chunk_size=args.chunk_size,
        model_name=args.model,
        quiet=args.quiet,
        media_root=args.allowed_local_media_path,
    )
    _print(summary)
    _outputs(args.out, "ground.jsonl", "ground.parquet", "summary.json")
    return 0


def _analyze_stories(args) -> int:
    from . import culture, stories

    result = stories.analyze(
        args.run_dirs,
        hofstede=args.hofstede or culture.HOFSTEDE_CSV,
        wvs=args.wvs or culture.WVS_CSV,
        clip_path=args.clip,
        out_dir=args.out,
        top_k=args.top_k,
        wvs_standardize=not args.wvs_raw,
        device=default_device(args.device) if args.clip else "cpu",
        permutations=args.permutations,
    )
    for model, m in result["models"].items():
        print(f"{model}: {m['num_stories']} stories, {len(m['nationalities'])} nationalities")
        for a in m["alignment"]:
            print(
                f"  {a['table']}: Kendall tau-b {a['tau']:.3f} (Mantel p={a['p']:.3g}, {a['pairs']} pairs); "
                f"lacking data: {', '.join(a['lacking']) or '-'}"
            )
    print(f"CLIP: {result['clip']}")
    print_outputs(*(Path(args.out or args.run_dirs[0]) / f"analysis.{ext}" for ext in ("html", "md", "json")))
    return 0
