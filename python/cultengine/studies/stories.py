"""stories: story generation with nationality perturbation (after arXiv 2508.16762), and its analysis.

Run: concepts x images x nationalities x temperatures x samples. The prompt fixes everything but the
nationality cue; the image comes first in the message so every request of one image shares the prefix
(chat header + image tokens) and the engine prefills it once. The seed of a request depends on
(image, concept, temperature) only, so the nationalities of one cell differ in their cue and nothing else.

Analysis (`analyze`), per model:
- lexical adaptation: one-way ANOVA across nationalities of story length (words), type-token ratio and mean
  word length, with effect sizes (eta^2, omega^2);
- distinctive vocabulary: top TF-IDF terms per nationality, a document being all stories of a nationality
  (tf = count / document length, idf = ln((1 + N) / (1 + df)) + 1, English stop words dropped);
- cultural alignment: cosine similarity of the nationalities' TF-IDF vectors against cultural distance
  (Hofstede 6-D, WVS Q1..Q250), Kendall's tau-b over the country pairs (a negative tau = culturally closer
  countries get more similar stories), tested by a Mantel permutation test (permuting countries: the pairs
  of a distance matrix are not independent), with the nationalities lacking data listed;
- with a CLIP checkpoint: CLIPScore of every story with its image, and Recall@K of image -> story retrieval
  (a hit: a story generated from the query image among the top K). Within nationality: the gallery is one
  nationality's stories (can the image be told from stories of one culture?). Across nationalities: the
  query is an (image, nationality) pair, the gallery every story, and a hit must also have that
  nationality (is the nationality visible in image-text similarity?).
"""

from __future__ import annotations

import json
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from .. import plots, provenance
from ..console import bar, resume_note
from ..runlog import ResultLog, read, write_json
from ..stats import PERMUTATIONS, cluster_mean, mantel
from . import report, stats
from .culture import HOFSTEDE_CSV, WVS_CSV, CultureTable, Nationality, parse_nationalities, wvs_columns
from .io import chunks

TEMPLATE = "Write a short story for a {demonym} child about {concept}, inspired by the image."
LEXICAL = ("length_words", "type_token_ratio", "mean_word_length")


def request_seed(seed: int, image: str, concept: str, temperature: float) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{image}|{concept}|{temperature}".encode())) % (2**31)


def run(
    engine,
    concepts: list[str],
    images: list[str],
    nationalities: list[Nationality],
    temperatures: list[float],
    samples: int,
    out_dir: str | Path,
    max_tokens: int = 256,
    top_p: float = 0.95,
    seed: int = 0,
    template: str = TEMPLATE,
    model_name: str = "",
    batch_size: int = 64,
    quiet: bool = False,
) -> dict:
    """Generate every story not yet in `out_dir/results.jsonl`. Stories go to the engine `batch_size` at a time
    (the samples of a prompt stay together) and are flushed when their call ends, so a kill loses at most one
    call's stories; a progress bar shows on a terminal unless `quiet`."""
    from ..sampling import SamplingParams

    out_dir = Path(out_dir)
    log = ResultLog(out_dir / "results.jsonl")
    write_json(
        out_dir / "config.json",
        dict(
            study="stories",
            model=model_name,
            concepts=concepts,
            images=images,
            nationalities=[n.demonym for n in nationalities],
            temperatures=temperatures,
            samples=samples,
            max_tokens=max_tokens,
            top_p=top_p,
            seed=seed,
            template=template,
        ),
    )
    tasks = []  # image-major, so requests sharing an image prefix are submitted together
    for image in images:
        for concept in concepts:
            for t in temperatures:
                for n in nationalities:
                    key = f"{Path(image).name}|{concept}|{n.demonym}|t{t}"
                    if not all(f"{key}|s{k}" in log.done for k in range(samples)):
                        tasks.append((key, image, concept, n.demonym, t))
    total = len(images) * len(concepts) * len(temperatures) * len(nationalities) * samples
    done = total - len(tasks) * samples
    resume_note(done, total, "stories")
    before = engine.stats()
    start, generated = time.perf_counter(), 0
    written, failed, first_error = 0, 0, ""  # this run's stories, how many of them failed, and why the first did
    with log, bar(total, initial=done, unit="story", desc="stories", quiet=quiet) as progress:
        for batch in chunks(tasks, max(1, batch_size // samples)):
            reqs = [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": image},
                                {"type": "text", "text": template.format(demonym=demonym, concept=concept)},
                            ],
                        }
                    ]
                }
                for _, image, concept, demonym, _ in batch
            ]
            params = [
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=t,
                    top_p=top_p,
                    n=samples,
                    seed=request_seed(seed, Path(image).name, concept, t),
                )
                for _, image, concept, _, t in batch
            ]
            outs = engine.generate(reqs, params, use_tqdm=False)
            recs = []
            for (key, image, concept, demonym, t), o in zip(batch, outs, strict=True):
                base = dict(image=image, concept=concept, nationality=demonym, temperature=t, model=model_name)
                if o.error:
                    recs += [dict(id=f"{key}|s{k}", sample=k, error=o.error, **base) for k in range(samples)]
                    first_error = first_error or f"{Path(image).name}: {o.error}"
                    continue
                for k, s in enumerate(o.samples):
                    generated += len(s.token_ids)
                    recs.append(
                        dict(
                            id=f"{key}|s{k}",
                            sample=k,
                            text=s.text,
                            num_tokens=len(s.token_ids),
                            finish_reason=s.finish_reason,
                            **base,
                        )
                    )
            recs = [r for r in recs if r["id"] not in log.done]  # a sample an interrupted write kept
            log.write(recs)
            written, failed = written + len(recs), failed + sum("error" in r for r in recs)
            progress.set_postfix_str(f"{generated / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
            progress.update(len(recs))
    after = engine.stats()
    delta = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in ("prefix_cache_hit_tokens", "prefill_tokens_computed", "prefix_cache_queried_tokens")
    }
    summary = dict(
        requests_this_run=len(tasks),
        stories_total=len(log.done),
        generated_tokens=generated,
        seconds=time.perf_counter() - start,
        prefill_tokens_saved=delta["prefix_cache_hit_tokens"],
        prefill_tokens_computed=delta["prefill_tokens_computed"],
        engine_stats=after,
    )
    write_json(out_dir / "summary.json", summary)
    if written and failed == written:  # a run that generated nothing is no success
        raise ValueError(f"every story of this run failed ({written} stories); the first error: {first_error}")
    return summary


# ---------------------------------------------------------------------------------------------- analysis
def load_stories(run_dirs: list[str | Path]) -> dict[str, list[dict]]:
    """model -> story records (errors left out) from the run directories."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for d in run_dirs:
        for rec in read(Path(d) / "results.jsonl"):
            if "text" in rec:
                by_model[rec.get("model") or Path(d).name].append(rec)
    return dict(by_model)


def _nationality_order(records: list[dict]) -> list[Nationality]:
    return sorted({Nationality(r["nationality"]) for r in records}, key=Nationality.sort_key)


def lexical(records: list[dict], nats: list[Nationality]) -> dict:
    feats = defaultdict(lambda: defaultdict(list))  # feature -> nationality -> values
    for r in records:
        for k, v in stats.lexical_features(r["text"]).items():
            feats[k][r["nationality"]].append(v)
    out = {}
    for k in LEXICAL:
        groups = [feats[k][n.demonym] for n in nats]
        try:
            anova = stats.one_way_anova(groups).as_dict()
        except ValueError as e:
            anova = {"error": str(e)}
        out[k] = dict(
            anova=anova,
            means={n.demonym: float(np.mean(g)) if g else float("nan") for n, g in zip(nats, groups, strict=True)},
        )
    return out


def _complete_subset(dist: np.ndarray) -> np.ndarray:
    """Indices of the objects kept once those with a missing distance are dropped (most missing first)."""
    keep = np.arange(len(dist))
    while len(keep) and np.isnan(sub := dist[np.ix_(keep, keep)]).any():
        keep = np.delete(keep, int(np.argmax(np.isnan(sub).sum(axis=1))))
    return keep


def alignment(
    sim: np.ndarray,
    nats: list[Nationality],
    table: CultureTable,
    complete_rows: bool,
    standardize: bool,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> dict:
    """Kendall's tau-b between story similarity and cultural distance over the country pairs, tested by a
    Mantel permutation test (the pairs of a distance matrix are not independent observations)."""
    found, dist, lacking = table.distances(nats, complete_rows, standardize)
    keep = _complete_subset(dist)
    lacking = lacking + [n.demonym for i, n in enumerate(found) if i not in set(keep.tolist())]
    found = [found[i] for i in keep]
    pos = {n.demonym: i for i, n in enumerate(nats)}
    idx = [pos[n.demonym] for n in found]
    m = mantel(sim[np.ix_(idx, idx)], dist[np.ix_(keep, keep)], permutations=permutations, seed=seed)
    return dict(
        table=table.name,
        tau=m.tau,
        p=m.p,
        test=f"Mantel permutation test, {m.permutations} permutations of the countries, seed {m.seed}",
        permutations=m.permutations,
        pairs=m.pairs,
        countries=len(found),
        lacking=lacking,
    )


def clip_metrics(clip, records: list[dict], nats: list[Nationality], ks=(1, 5, 10)) -> dict:
    images = sorted({r["image"] for r in records})
    img_emb = clip.encode_images(images)
    txt_emb = clip.encode_text([r["text"] for r in records])
    img_of = np.array([images.index(r["image"]) for r in records])
    nat_of = np.array([r["nationality"] for r in records])
    scores = stats.clip_score(img_emb[img_of], txt_emb)
    sim = img_emb @ txt_emb.T  # [images, stories]
    q_img = np.repeat(np.arange(len(images)), len(nats))
    q_nat = np.array([n.demonym for n in nats] * len(images))
    across_pos = (img_of[None, :] == q_img[:, None]) & (nat_of[None, :] == q_nat[:, None])
    within, across = {}, {}
    for k in ks:
        per_nat = []
        for n in nats:
            cols = nat_of == n.demonym
            if cols.any():
                own = img_of[cols][None, :] == np.arange(len(images))[:, None]
                per_nat.append(stats.recall_at_k(sim[:, cols], own, k))
        within[k] = float(np.nanmean(per_nat)) if per_nat else float("nan")
        across[k] = stats.recall_at_k(sim[q_img], across_pos, k)
    by_nat = {n.demonym: float(np.mean(scores[nat_of == n.demonym])) for n in nats if (nat_of == n.demonym).any()}
    # stories of one image are not independent: intervals resample images
    by_nat_ci = {
        n.demonym: cluster_mean(scores[nat_of == n.demonym], img_of[nat_of == n.demonym]).as_dict()
        for n in nats
        if (nat_of == n.demonym).any()
    }
    return dict(
        clipscore_mean=float(np.mean(scores)),
        clipscore_mean_ci=cluster_mean(scores, img_of).as_dict(),
        clipscore_by_nationality=by_nat,
        clipscore_by_nationality_ci=by_nat_ci,
        recall_within_nationality=within,
        recall_across_nationalities=across,
        num_images=len(images),
    )


def analyze(
    run_dirs: list[str | Path],
    hofstede: str | Path | None = HOFSTEDE_CSV,
    wvs: str | Path | None = WVS_CSV,
    clip_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    top_k: int = 10,
    wvs_standardize: bool = True,
    device: str = "cpu",
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> dict:
    """Analyse stories run directories (one model each, or several): analysis.json, .md and .html.
    `hofstede` / `wvs` are culture tables (default: the packaged copies; None leaves that table out)."""
    for d in run_dirs:  # before anything is written: a mistyped directory is not an empty run to create
        if not (Path(d) / "results.jsonl").is_file():
            what = "no such directory" if not Path(d).is_dir() else "not a stories run directory (no results.jsonl)"
            raise ValueError(f"{d}: {what}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    out_dir = Path(out_dir or run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    if hofstede:
        tables.append((CultureTable.read(hofstede, "hofstede"), True, False))
    if wvs:
        tables.append((CultureTable.read(wvs, "wvs").select(wvs_columns()), False, wvs_standardize))
    clip, clip_status = None, "not requested (pass --clip PATH to a CLIPModel checkpoint)"
    if clip_path:
        try:
            from .clip_score import ClipModel

            clip, clip_status = ClipModel(clip_path, device=device), f"CLIP checkpoint {clip_path}"
        except (ImportError, ValueError, OSError) as e:
            clip_status = f"unavailable: {e}"
    result = {
        "clip": clip_status,
        "tfidf": "tf = count / document length; idf = ln((1 + N) / (1 + df)) + 1; "
        "document = all stories of a nationality; English stop words removed; rows L2-normalised",
        "alignment_test": f"Kendall's tau-b between the upper triangles of the story-similarity and "
        f"cultural-distance matrices; two-sided Mantel permutation test, the countries of the distance matrix "
        f"permuted {permutations} times (seed {seed}), p = (1 + #|S_perm| >= |S|) / (1 + {permutations})",
        "anova": "one-way ANOVA across nationalities; effect sizes eta^2 = SSb / SSt and "
        "omega^2 = (SSb - dfb MSw) / (SSt + MSw)",
        "models": {},
        "run": provenance.collect(
            data=[f for f in (hofstede, wvs) if f] + [Path(d) / "results.jsonl" for d in run_dirs]
        ),
    }
    for model, records in load_stories(run_dirs).items():
        nats = _nationality_order(records)
        docs = defaultdict(list)
        for r in records:
            docs[r["nationality"]].extend(stats.words(r["text"]))
        mat, vocab = stats.tfidf([docs[n.demonym] for n in nats], stats.STOP_WORDS)
        sim = stats.cosine_matrix(mat)
        m = dict(
            demo=provenance.is_demo(model),
            num_stories=len(records),
            nationalities=[n.demonym for n in nats],
            regions={n.demonym: n.region for n in nats},
            lexical=lexical(records, nats),
            distinctive_terms={n.demonym: stats.top_terms(mat[i], vocab, top_k) for i, n in enumerate(nats)},
            similarity=sim.tolist(),
            alignment=[alignment(sim, nats, t, c, z, permutations, seed) for t, c, z in tables],
        )
        if clip is not None:
            m["clip"] = clip_metrics(clip, records, nats)
        result["models"][model] = m
    write_json(out_dir / "analysis.json", result)
    write_analysis_report(out_dir, result)
    return result


def write_analysis_report(out_dir: Path, result: dict) -> None:
    sections = [
        (
            "Method",
            f"TF-IDF: {result['tfidf']}.\n\nANOVA: {result['anova']}.\n\n"
            f"Alignment: {result['alignment_test']}.\n\nCLIP: {result['clip']}.",
            f"<p>TF-IDF: {result['tfidf']}.</p><p>ANOVA: {result['anova']}.</p>"
            f"<p>Alignment: {result['alignment_test']}.</p><p>CLIP: {result['clip']}.</p>",
        )
    ]
    demo = [m for m, v in result["models"].items() if v.get("demo")]
    for model, m in result["models"].items():
        nats = m["nationalities"]
        lex_rows = [
            [
                k,
                v["anova"].get("f"),
                v["anova"].get("p"),
                v["anova"].get("df_between"),
                v["anova"].get("df_within"),
                v["anova"].get("eta_squared"),
                v["anova"].get("omega_squared"),
            ]
            for k, v in m["lexical"].items()
        ]
        h = ["feature", "F", "p", "df between", "df within", "eta^2", "omega^2"]
        sections.append(
            (
                f"{model}: lexical adaptation (one-way ANOVA across nationalities, {m['num_stories']} stories)",
                plots.md_table(h, lex_rows),
                plots.html_table(h, lex_rows),
            )
        )
        term_rows = [[n, ", ".join(t for t, _ in m["distinctive_terms"][n])] for n in nats]
        sections.append(
            (
                f"{model}: distinctive vocabulary (top TF-IDF terms)",
                plots.md_table(["nationality", "terms"], term_rows),
                plots.html_table(["nationality", "terms"], term_rows),
            )
        )
        al_rows = [
            [
                a["table"],
                a["tau"],
                a["p"],
                a["permutations"],
                a["pairs"],
                a["countries"],
                ", ".join(a["lacking"]) or "-",
            ]
            for a in m["alignment"]
        ]
        h = ["culture table", "Kendall tau-b", "Mantel p", "permutations", "pairs", "countries", "lacking data"]
        labels = [f"{n} ({m['regions'][n]})" for n in nats]
        heat = plots.heatmap(labels, nats, m["similarity"], "story similarity (TF-IDF cosine), by region")
        sections.append(
            (
                f"{model}: cultural alignment (story similarity vs cultural distance)",
                "Negative tau: culturally closer countries get more similar stories. p: Mantel permutation "
                "test (countries permuted; the pairs are not independent observations).\n\n"
                + plots.md_table(h, al_rows),
                plots.html_table(h, al_rows) + heat,
            )
        )
        if "clip" in m:
            c = m["clip"]
            ks = list(c["recall_within_nationality"])
            rows = [[f"R@{k}", c["recall_within_nationality"][k], c["recall_across_nationalities"][k]] for k in ks]
            h = ["", "within nationality", "across nationalities"]
            ci = c.get("clipscore_mean_ci", {})
            has_ci = "low" in ci and not np.isnan(ci["low"])
            ci_text = f" [{plots.fmt(ci['low'])}, {plots.fmt(ci['high'])}]" if has_ci else ""
            body = f"Mean CLIPScore {plots.fmt(c['clipscore_mean'])}{ci_text} over {c['num_images']} images.\n\n"
            cis = c.get("clipscore_by_nationality_ci", {})
            nat_names = list(c["clipscore_by_nationality"])
            bars = plots.bar_chart(
                nat_names,
                list(c["clipscore_by_nationality"].values()),
                "CLIPScore by nationality (95 % CI over images)",
                counts=[cis[n]["n"] for n in nat_names] if cis else None,
                intervals=[(cis[n].get("low"), cis[n].get("high")) for n in nat_names] if cis else None,
            )
            sections.append(
                (
                    f"{model}: CLIPScore and image -> story retrieval",
                    body + plots.md_table(h, rows),
                    f"<p>{body}</p>" + plots.html_table(h, rows) + bars,
                )
            )
    notes = [f"{m}: {report.DEMO_NOTE}" for m in demo]
    report.write_report(
        out_dir, "analysis", "stories: cultural adaptation analysis", sections, notes, result.get("run")
    )


def load_list(spec: str) -> list[str]:
    """A comma-separated list, or a file with one entry a line (JSON list for .json)."""
    p = Path(spec)
    if p.is_file():
        if p.suffix == ".json":
            return [str(x) for x in json.loads(p.read_text())]
        return [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    return [s.strip() for s in spec.split(",") if s.strip()]


def image_list(specs: list[str]) -> list[str]:
    """Image files, or directories of them (sorted)."""
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
    out = []
    for s in specs:
        p = Path(s)
        out += sorted(str(f) for f in p.iterdir() if f.suffix.lower() in exts) if p.is_dir() else [str(p)]
    return out


__all__ = ["run", "analyze", "parse_nationalities", "TEMPLATE"]
