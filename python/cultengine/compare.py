"""`cultengine compare RUN_DIR...`: models side by side on the same benchmark (bench, values or stories runs;
the study comparisons are in `studies/compare.py`). Bench runs:

Every run must hold the same questions: the same ids with the same prompt and images (`prompt_hash`), the
same suite and circular setting, and, where both runs recorded them, benchmark files with the same sha256.
Otherwise the comparison is refused with the difference named.

Per model: accuracy overall and by continent, region, category and question type, each with its 95 %
interval (`stats.proportion`: Wilson, or Wilson at the cluster-bootstrap effective n where questions share
an image) and the Western gap (`stats.group_gap`). Per pair of models and group: the paired accuracy
difference on the same questions (`stats.paired`: paired cluster-bootstrap interval; exact McNemar p, or a
cluster sign-flip permutation p where questions share an image), with Holm's adjustment over the groups of
the pair. Countries every model fails: accuracy at or below the country's chance level for every model.
Outputs: compare.json, compare.csv (the table, for papers), compare.md and compare.html.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any

from . import plots, provenance
from .runlog import Incomparable, atomic_write, read, write_json

# numpy and the bench modules (which load torch) are imported by the functions that use them, so that
# `cultengine --help` does not load them.

GROUPS = ("continent", "region", "category", "question_type")
MATCH = ("suite", "circular")


class Run:
    """One bench run directory: its config, its results by id and its summary."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg, summ = self.path / "config.json", self.path / "summary.json"
        if not cfg.exists() or not summ.exists():
            raise Incomparable(f"{self.path} is not a finished bench run (no config.json or summary.json)")
        self.config = json.loads(cfg.read_text(encoding="utf-8"))
        self.summary = json.loads(summ.read_text(encoding="utf-8"))
        self.records = {r["id"]: r for r in read(self.path / "results.jsonl")}
        self.name = self.config.get("model_name") or self.path.name

    @property
    def data_hashes(self) -> dict[str, str] | None:
        data = self.summary.get("run", {}).get("data")
        if not data or any(d.get("sha256") is None for d in data):
            return None
        return {Path(d["file"]).name: d["sha256"] for d in data}


def check_comparable(runs: list[Run]) -> None:
    """Raise `Incomparable` naming the first difference between the first run and another."""
    ref = runs[0]
    for run in runs[1:]:
        for key in MATCH:
            if ref.config.get(key) != run.config.get(key):
                raise Incomparable(
                    f"{ref.path} and {run.path} differ in {key}: {ref.config.get(key)!r} vs {run.config.get(key)!r}"
                )
        a, b = ref.data_hashes, run.data_hashes  # the same contents under any file names are the same data
        if a is not None and b is not None and sorted(a.values()) != sorted(b.values()):
            raise Incomparable(
                f"{ref.path} and {run.path} ran on different data: "
                f"{sorted(a.items())} vs {sorted(b.items())} (file, sha256)"
            )
        only_a, only_b = ref.records.keys() - run.records.keys(), run.records.keys() - ref.records.keys()
        if only_a or only_b:

            def some(ids):
                return ", ".join(sorted(ids)[:5]) + (" ..." if len(ids) > 5 else "")

            raise Incomparable(
                f"{ref.path} and {run.path} hold different question sets: {len(only_a)} ids only in "
                f"the first ({some(only_a)}), {len(only_b)} only in the second ({some(only_b)})"
            )
        changed = [i for i, r in ref.records.items() if r.get("prompt_hash") != run.records[i].get("prompt_hash")]
        if changed:
            raise Incomparable(
                f"{ref.path} and {run.path}: {len(changed)} questions differ in their prompt or "
                f"images (e.g. {', '.join(sorted(changed)[:3])}): different data versions or --template"
            )


def _unique_names(runs: list[Run]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{n} ({r.path.name})" if names.count(n) > 1 else n for n, r in zip(names, runs, strict=True)]


def _subsets(records: list[dict]) -> list[tuple[str, str, list[str]]]:
    """(group key, group value, ids) for overall and every group value of `GROUPS`."""
    out = [("overall", "all", [r["id"] for r in records])]
    for key in GROUPS:
        by: dict[str, list[str]] = {}
        for r in records:
            by.setdefault(r.get("groups", {}).get(key) or "unknown", []).append(r["id"])
        if len(by) > 1 or "unknown" not in by:
            out += [(key, value, ids) for value, ids in sorted(by.items())]
    return out


def run_kind(path: Path) -> str:
    """'bench', 'values' or 'stories', from the files a run directory holds."""
    cfg, summ = path / "config.json", path / "summary.json"
    config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.exists() else {}
    if config.get("study") == "stories":
        return "stories"
    if "suite" in config:
        return "bench"
    if summ.exists() and "image_minus_text" in json.loads(summ.read_text(encoding="utf-8")):
        return "values"
    raise Incomparable(f"{path} is not a finished bench, values or stories run directory")


def compare(run_dirs: list[str | Path]) -> dict[str, Any]:
    """The comparison of runs as one dict (what compare.json holds)."""
    paths = [Path(d) for d in run_dirs]
    if len(paths) < 2:
        raise Incomparable("compare needs at least two runs")
    kinds = [run_kind(p) for p in paths]
    if len(set(kinds)) > 1:
        raise Incomparable(
            "runs of different kinds: " + ", ".join(f"{p} ({k})" for p, k in zip(paths, kinds, strict=True))
        )
    if kinds[0] != "bench":
        from .studies import compare as studies

        return (studies.compare_values if kinds[0] == "values" else studies.compare_stories)(paths)
    return compare_bench(paths)


def compare_bench(run_dirs: list[Path]) -> dict[str, Any]:
    """The comparison of bench runs."""
    from . import stats
    from .bench import metrics
    from .bench.report import MIN_CELL_N

    runs = [Run(d) for d in run_dirs]
    check_comparable(runs)
    names = _unique_names(runs)
    suite = runs[0].config["suite"]
    metric = metrics.PRIMARY[suite]
    # a question an engine failed on (or without a label) in any run is left out of every model's figures
    order = [i for i in runs[0].records if all(r.records[i].get("correct") is not None for r in runs)]
    recs = [[run.records[i] for i in order] for run in runs]
    table, gaps = {}, {}
    for name, rs in zip(names, recs, strict=True):
        table[name] = {
            f"{k}|{v}": metrics.figures([rs[j] for j in _index(order, ids)], suite) for k, v, ids in _subsets(rs)
        }
        gaps[name] = metrics.western_gap(rs, suite)
    clusters = [metrics.cluster_of(r) for r in recs[0]]
    pairs = []
    for (a, ra), (b, rb) in combinations(zip(names, recs, strict=True), 2):
        tests = []
        for key, value, ids in _subsets(recs[0]):
            idx = _index(order, ids)
            res = stats.paired(
                [bool(ra[j]["correct"]) for j in idx], [bool(rb[j]["correct"]) for j in idx], [clusters[j] for j in idx]
            )
            tests.append({"group_key": key, "group": value, **res})
        for t, adj in zip(tests, stats.holm([t["p"] if t.get("p") is not None else 1.0 for t in tests]), strict=True):
            t["p_holm"] = round(adj, 6)
        pairs.append({"a": a, "b": b, "tests": tests})
    chance = {k: v["chance"] for k, v in table[names[0]].items() if v.get("chance") is not None}
    return {
        "kind": "bench",
        "metric": metric,
        "suite": suite,
        "models": names,
        "runs": [str(r.path) for r in runs],
        "demo": [n for n, r in zip(names, runs, strict=True) if r.summary.get("demo")],
        "questions": len(order),
        "left_out": len(runs[0].records) - len(order),
        "table": table,
        "western_gap": gaps,
        "paired": pairs,
        "countries_all_fail": _all_fail(recs, names, suite),
        "chance": chance,
        "min_cell_n": int(runs[0].config.get("min_cell_n") or MIN_CELL_N),
        "methods": METHODS,
        "run": provenance.collect(data=[Path(r.path) / "results.jsonl" for r in runs]),
    }


METHODS = [
    "Accuracy intervals: Wilson 95 % score interval; where questions share an image, Wilson at the effective "
    "sample size (design effect from a cluster bootstrap over images, 2,000 resamples).",
    "Paired differences (model A minus model B on the same questions): 95 % paired cluster-bootstrap interval "
    "(images resampled); p from the exact McNemar test when every question has its own image, else from a "
    "cluster sign-flip permutation test (9,999 permutations); p_holm: Holm's adjustment over the groups of "
    "one pair of models.",
    "Western gap: stratified cluster-bootstrap interval and a permutation p-value over images.",
    "Countries every model fails: accuracy at or below chance (uniform guessing, averaged over the country's "
    "questions) for every model.",
]


def _index(order: list[str], ids: list[str]) -> list[int]:
    pos = {i: k for k, i in enumerate(order)}
    return [pos[i] for i in ids if i in pos]


def _all_fail(recs: list[list[dict]], names: list[str], suite: str) -> list[dict]:
    from .bench import metrics

    m = metrics.PRIMARY[suite]
    per_model = [metrics.grouped(rs, "country", suite) for rs in recs]
    out = []
    for country, fig in per_model[0].items():
        if country == "unknown" or fig.get("chance") is None:
            continue
        figs = [pm.get(country, {}) for pm in per_model]
        if all(f.get(m) is not None and f[m] <= f["chance"] for f in figs):
            out.append(
                {
                    "country": country,
                    "n": fig["n"],
                    "chance": fig["chance"],
                    "accuracy": {n: f[m] for n, f in zip(names, figs, strict=True)},
                }
            )
    return out


# ------------------------------------------------------------------------------------------------ output
def _cell(fig: dict, metric: str) -> str:
    if fig.get(metric) is None:
        return "-"
    ci = fig.get(f"{metric}_ci")
    return f"{100 * fig[metric]:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else f"{100 * fig[metric]:.1f}"


def to_csv(result: dict) -> str:
    """One row per model and group: the table papers cite."""
    m = result["metric"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "group_key", "group", "n", m, "ci_low", "ci_high", "ci_method", "chance"])
    for model, groups in result["table"].items():
        for key, fig in groups.items():
            gk, _, g = key.partition("|")
            ci = fig.get(f"{m}_ci") or [None, None]
            w.writerow([model, gk, g, fig["n"], fig.get(m), ci[0], ci[1], fig.get("ci_method"), fig.get("chance")])
    return buf.getvalue()


def markdown_parts(result: dict) -> tuple[list[str], list[str]]:
    """(summary lines, table lines) of the comparison report in markdown."""
    from .bench.report import CHANCE_NOTE, gap_line

    m, models = result["metric"], result["models"]
    head = [f"# cultengine compare: {len(models)} models, {result['questions']} questions", ""]
    if result.get("left_out"):
        head += [
            f"> {result['left_out']} questions without a result in every run (engine errors, no label) "
            "are left out of every model's figures.",
            "",
        ]
    head += [f"> {n}: {CHANCE_NOTE}" for n in result["demo"]] + ([""] if result["demo"] else [])
    ranked = sorted(models, key=lambda n: -(result["table"][n]["overall|all"].get(m) or 0))
    head += ["## Summary", ""] + [f"- {n}: {m} {_cell(result['table'][n]['overall|all'], m)} %" for n in ranked]
    for pair in result["paired"]:
        t = pair["tests"][0]
        head.append(
            f"- {pair['a']} minus {pair['b']}: {100 * t['value']:+.1f} points "
            f"[{100 * t['low']:.1f}, {100 * t['high']:.1f}], p = {plots.fmt(t['p'])} ({t['test']})"
        )
    head.append("")
    keys = list(result["table"][models[0]])
    rows = [
        [
            k.replace("|", ": "),
            result["table"][models[0]][k]["n"],
            *(_cell(result["table"][n].get(k, {}), m) for n in models),
        ]
        for k in keys
    ]
    tables = ["## Accuracy by group (95 % CI)", "", plots.md_table(["group", "n", *models], rows), ""]
    tables += _pairwise_matrix(result)
    tables += ["## Western vs non-Western", ""]
    tables += [
        f"- {n}: {gap_line(g)}" if g else f"- {n}: no Western/non-Western split"
        for n, g in result["western_gap"].items()
    ] + [""]
    for pair in result["paired"]:
        h = ["group", "n", "A - B (points)", "95% CI", "A only right", "B only right", "p", "p (Holm)", "test"]
        prow = [
            [
                f"{t['group_key']}: {t['group']}",
                t["n"],
                f"{100 * t['value']:+.1f}",
                "-" if math.isnan(t["low"]) else f"[{100 * t['low']:.1f}, {100 * t['high']:.1f}]",
                t["only_a"],
                t["only_b"],
                t.get("p"),
                t["p_holm"],
                t["test"],
            ]
            for t in pair["tests"]
        ]
        tables += [f"## Paired: A = {pair['a']}, B = {pair['b']}", "", plots.md_table(h, prow), ""]
    fails = result["countries_all_fail"]
    tables += ["## Countries every model fails (accuracy <= chance for all)", ""]
    if fails:
        h = ["country", "n", "chance", *models]
        tables.append(
            plots.md_table(
                h,
                [
                    [
                        f["country"],
                        f["n"],
                        f"{100 * f['chance']:.1f}",
                        *(f"{100 * f['accuracy'][n]:.1f}" for n in models),
                    ]
                    for f in fails
                ],
            )
        )
    else:
        tables.append("None.")
    tables += ["", "## Methods", ""] + [f"- {x}" for x in result["methods"]] + [""]
    return head, tables + provenance.markdown(result["run"])


def _pairwise_matrix(result: dict) -> list[str]:
    """Overall differences of every pair at a glance: row model minus column model, points and p."""
    models = result["models"]
    if len(models) < 3:
        return []
    cell: dict[tuple[str, str], str] = {}
    for pair in result["paired"]:
        t = pair["tests"][0]
        cell[(pair["a"], pair["b"])] = f"{100 * t['value']:+.1f} (p {plots.fmt(t.get('p'))})"
        cell[(pair["b"], pair["a"])] = f"{-100 * t['value']:+.1f} (p {plots.fmt(t.get('p'))})"
    rows = [[a, *(cell.get((a, b), "") for b in models)] for a in models]
    return ["## Overall differences, row minus column (points, p)", "", plots.md_table(["", *models], rows), ""]


def figures(result: dict) -> list[str]:
    from .bench.report import MIN_CELL_N

    m, models = result["metric"], result["models"]
    ranked = sorted(models, key=lambda n: -(result["table"][n]["overall|all"].get(m) or 0))
    figs = [
        plots.bar_chart(
            ranked,
            [result["table"][n]["overall|all"].get(m) for n in ranked],
            f"ranking: overall {m} (95 % CI)",
            counts=[result["questions"]] * len(ranked),
            percent=True,
            intervals=[result["table"][n]["overall|all"].get(f"{m}_ci") or (None, None) for n in ranked],
            reference=result["chance"].get("overall|all"),
        )
    ]
    for key in ("continent", "category"):
        cols = [k for k in result["table"][models[0]] if k.startswith(f"{key}|")]
        if cols:
            grid = [[result["table"][n][c].get(m) for c in cols] for n in ranked]
            counts = [[result["table"][n][c]["n"] for c in cols] for n in ranked]
            figs.append(
                plots.heatmap(
                    ranked,
                    [c.partition("|")[2] for c in cols],
                    grid,
                    f"{m} (%) by {key}, n per cell",
                    counts=counts,
                    percent=True,
                    min_n=result.get("min_cell_n", MIN_CELL_N),
                )
            )
    return [f for f in figs if f]


def _renderers(kind: str):
    """(markdown parts, figures, csv) for a comparison of that kind."""
    if kind == "bench":
        return markdown_parts, figures, to_csv
    from .studies import compare as studies

    return {
        "values": (studies.values_markdown, studies.values_figures, studies.values_csv),
        "stories": (studies.stories_markdown, studies.stories_figures, studies.stories_csv),
    }[kind]


def write(result: dict, out_dir: str | Path) -> Path:
    """compare.json, compare.csv, compare.md and compare.html in `out_dir`; returns the page's path."""
    md_parts, figs_of, csv_of = _renderers(result["kind"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", result)
    atomic_write(out / "compare.csv", csv_of(result))
    head, tables = md_parts(result)
    atomic_write(out / "compare.md", "\n".join(head + tables))
    figs = "\n".join(f"<figure>{f}</figure>" for f in figs_of(result))
    page = (
        f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>cultengine compare</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{plots.PAGE_STYLE}</style>"
        f"</head><body>\n{plots.markdown_html(chr(10).join(head))}\n<h2>Plots</h2>\n{figs}\n"
        f"{plots.markdown_html(chr(10).join(tables))}\n</body></html>\n"
    )
    atomic_write(out / "compare.html", page)
    return out / "compare.html"


def run(run_dirs: list[str | Path], out_dir: str | Path) -> int:
    result = compare(run_dirs)  # Incomparable is a ValueError: the CLI's one-line error, exit 2
    page = write(result, out_dir)
    print("\n".join(line[2:] for line in md_parts_summary(result)))
    print(f"report: {page.resolve()}")
    print(f"table: {(Path(out_dir) / 'compare.csv').resolve()}")
    return 0


def md_parts_summary(result: dict) -> list[str]:
    """The summary bullets of a comparison (what the command prints)."""
    head, _ = _renderers(result["kind"])[0](result)
    return [line for line in head if line.startswith("- ")]


def bench_many(args: argparse.Namespace, bench_run) -> int:
    """`cultengine bench --model A --model B ...`: each model into its own folder of one parent folder, one
    after another, then the comparison into the parent folder."""
    from .bench.demo_checkpoint import resolve

    parent = Path(args.output_dir or Path("cultengine-runs") / "compare")
    dirs = []
    for i, model in enumerate(args.model):
        sub = copy.copy(args)
        sub.model = model
        name = resolve(model).name
        sub.output_dir = str(parent / f"{i + 1:02d}-{name}")
        code = bench_run(sub)
        if code:
            return code
        dirs.append(sub.output_dir)
    return run(dirs, parent)


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare bench runs of different models on the same benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="two or more run directories of one kind: bench, values, or stories (analysed)",
    )
    p.add_argument("--out", default="cultengine-compare", help="output directory (default cultengine-compare)")
    p.set_defaults(func=lambda a: run(a.run_dirs, a.out))
