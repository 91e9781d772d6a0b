"""`cultengine values | stories | ground | analyze stories` -- one command per study."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("values", help="cultural value sensitivity (WVS-style), with and without images")
    _engine_args(p, several_models=True)
    p.add_argument("--items", required=True, help="survey items: id, question, options, topic")
    p.add_argument(
        "--human", required=True, help="human answer distributions: item_id, country, distribution"
    )
    p.add_argument("--images", help="culture-specific images: country, category, image")
    p.add_argument(
        "--choices",
        choices=("label", "text"),
        default="label",
        help="score the option numbers (default) or the option texts",
    )
    p.set_defaults(func=_values)

    p = sub.add_parser("stories", help="story generation with nationality perturbation")
    _engine_args(p)
    p.add_argument("--concepts", required=True, help="comma-separated, or a file with one a line")
    p.add_argument("--images", required=True, nargs="+", help="image files or directories")
    p.add_argument("--nationalities", help="comma-separated demonyms or a file (default: the 42 shipped)")
    p.add_argument("--temperatures", default="0.3,0.7")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_stories)

    p = sub.add_parser("ground", help="CulturalGround: template -> refine -> relevance-filter VQA rows")
    _engine_args(p)
    p.add_argument("--input", required=True, help="entity records: id, entity, country, properties, image")
    p.add_argument("--languages", default="en")
    p.add_argument("--templates", help="templates JSON (default: the shipped ground_templates.json)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep rows with P(yes) >= this")
    p.add_argument("--chunk-size", type=int, default=1000)
    p.set_defaults(func=_ground)

    p = sub.add_parser("analyze", help="analyse a study's run directory")
    asub = p.add_subparsers(dest="study", required=True)
    a = asub.add_parser("stories", help="lexical, vocabulary, cultural-alignment and CLIP analysis")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    a.add_argument("--hofstede", help="Hofstede 6-D CSV (ctr,country,Demonym,pdi,...); default: the packaged "
                   "copy of Hofstede's published scores")
    a.add_argument("--wvs", help="WVS means CSV (ctr,country,Demonym,Q1..Q250); default: the packaged copy of "
                   "the World Values Survey means")
    a.add_argument("--wvs-raw", action="store_true", help="do not z-score the WVS columns")
    a.add_argument("--clip", help="CLIPModel checkpoint directory for CLIPScore and retrieval")
    a.add_argument("--device", default="cpu")
    a.add_argument("--out", help="output directory (default: the first RUN_DIR)")
    a.add_argument("--top-k", type=int, default=10, help="distinctive terms per nationality")
    a.add_argument("--permutations", type=int, default=9999, help="Mantel test permutations (default 9999)")
    a.set_defaults(func=_analyze_stories)


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
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)


def _engine(args, model: str | None = None):
    from .. import Engine
    from ..bench.demo_checkpoint import resolve

    return Engine(resolve(model or args.model), device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs)


def _print(summary: dict) -> None:
    print(
        json.dumps(
            {
                k: v
                for k, v in summary.items()
                if not isinstance(v, list | dict)
                or k in ("dropped_per_stage", "drop_reasons", "delta_by_category")
            },
            indent=2,
            default=str,
        )
    )


def _values(args) -> int:
    from . import values

    items = values.load_items(args.items)
    human, images = values.load_human(args.human, items), values.load_images(args.images)
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
        )
        _print(summary)
        runs.append(out)
    if len(runs) > 1:
        from .. import compare

        print(f"comparison: {compare.write(compare.compare(runs), args.out).resolve()}")
    return 0


def _stories(args) -> int:
    from . import stories

    summary = stories.run(
        _engine(args),
        stories.load_list(args.concepts),
        stories.image_list(args.images),
        stories.parse_nationalities(args.nationalities),
        [float(t) for t in args.temperatures.split(",")],
        args.samples,
        args.out,
        max_tokens=args.max_tokens,
        top_p=args.top_p,
        seed=args.seed,
        model_name=args.model,
    )
    _print(summary)
    return 0


def _ground(args) -> int:
    from . import ground

    summary = ground.run(
        _engine(args),
        args.input,
        args.out,
        [s.strip() for s in args.languages.split(",")],
        ground.load_templates(args.templates),
        threshold=args.threshold,
        chunk_size=args.chunk_size,
        model_name=args.model,
    )
    _print(summary)
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
        device=args.device,
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
    print(f"report: {args.out or args.run_dirs[0]}/analysis.{{md,html,json}}")
    return 0
