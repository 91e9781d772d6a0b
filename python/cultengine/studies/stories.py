"""stories: story generation with nationality perturbation (after arXiv 2508.16762), and its analysis.

Run: concepts x images x nationalities x temperatures x samples. The prompt fixes everything but the
nationality cue; the image comes first in the message so every request of one image shares the prefix
(chat header + image tokens) and the engine prefills it once. The seed of a request depends on
(image, concept, temperature) only, so the nationalities of one cell differ in their cue and nothing else.

Analysis (`analyze`), per model:
- lexical adaptation: one-way ANOVA across nationalities of story length (words), type-token ratio and mean
  word length;
- distinctive vocabulary: top TF-IDF terms per nationality, a document being all stories of a nationality
  (tf = count / document length, idf = ln((1 + N) / (1 + df)) + 1, English stop words dropped);
- cultural alignment: cosine similarity of the nationalities' TF-IDF vectors against cultural distance
  (Hofstede 6-D, WVS Q1..Q250), Kendall's tau-b over the country pairs (a negative tau = culturally closer
  countries get more similar stories), with the nationalities lacking data listed;
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

from .. import plots
from ..runlog import ResultLog, read, write_json
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
    batch_size: int = 256,
) -> dict:
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
    before = engine.stats()
    start, generated = time.perf_counter(), 0
    with log:
        for batch in chunks(tasks, batch_size):
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
                base = dict(
                    image=image, concept=concept, nationality=demonym, temperature=t, model=model_name
                )
                if o.error:
                    recs += [dict(id=f"{key}|s{k}", sample=k, error=o.error, **base) for k in range(samples)]
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
            log.write(recs)
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
            means={
                n.demonym: float(np.mean(g)) if g else float("nan") for n, g in zip(nats, groups, strict=True)
            },
        )
    return out


def alignment(
    sim: np.ndarray, nats: list[Nationality], table: CultureTable, complete_rows: bool, standardize: bool
) -> dict:
    found, dist, lacking = table.distances(nats, complete_rows, standardize)
    pos = {n.demonym: i for i, n in enumerate(nats)}
    idx = [pos[n.demonym] for n in found]
    iu = np.triu_indices(len(idx), k=1)
    s = sim[np.ix_(idx, idx)][iu]
    d = dist[iu]
    keep = ~np.isnan(d)
    k = stats.kendall_tau_b(s[keep], d[keep])
    return dict(
        table=table.name,
        tau=k.tau,
        p=k.p,
        z=k.z,
        pairs=int(keep.sum()),
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
    by_nat = {
        n.demonym: float(np.mean(scores[nat_of == n.demonym])) for n in nats if (nat_of == n.demonym).any()
    }
    return dict(
        clipscore_mean=float(np.mean(scores)),
        clipscore_by_nationality=by_nat,
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
) -> dict:
    """Analyse stories run directories; `hofstede` / `wvs` are culture tables (default: the packaged
    copies; None leaves that table out of the alignment)."""
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
        "models": {},
    }
    for model, records in load_stories(run_dirs).items():
        nats = _nationality_order(records)
        docs = defaultdict(list)
        for r in records:
            docs[r["nationality"]].extend(stats.words(r["text"]))
        mat, vocab = stats.tfidf([docs[n.demonym] for n in nats], stats.STOP_WORDS)
        sim = stats.cosine_matrix(mat)
        m = dict(
            num_stories=len(records),
            nationalities=[n.demonym for n in nats],
            regions={n.demonym: n.region for n in nats},
            lexical=lexical(records, nats),
            distinctive_terms={n.demonym: stats.top_terms(mat[i], vocab, top_k) for i, n in enumerate(nats)},
            similarity=sim.tolist(),
            alignment=[alignment(sim, nats, t, c, z) for t, c, z in tables],
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
            f"TF-IDF: {result['tfidf']}. CLIP: {result['clip']}.",
            f"<p>TF-IDF: {result['tfidf']}.</p><p>CLIP: {result['clip']}.</p>",
        )
    ]
    for model, m in result["models"].items():
        nats = m["nationalities"]
        lex_rows = [
            [
                k,
                v["anova"].get("f"),
                v["anova"].get("p"),
                v["anova"].get("df_between"),
                v["anova"].get("df_within"),
            ]
            for k, v in m["lexical"].items()
        ]
        h = ["feature", "F", "p", "df between", "df within"]
        sections.append(
            (
                f"{model}: lexical adaptation (one-way ANOVA across nationalities, "
                f"{m['num_stories']} stories)",
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
            [a["table"], a["tau"], a["p"], a["pairs"], a["countries"], ", ".join(a["lacking"]) or "-"]
            for a in m["alignment"]
        ]
        h = ["culture table", "Kendall tau-b", "p", "pairs", "countries", "lacking data"]
        labels = [f"{n} ({m['regions'][n]})" for n in nats]
        heat = plots.heatmap(
            labels, nats, m["similarity"], "story similarity (TF-IDF cosine), by region"
        )
        sections.append(
            (
                f"{model}: cultural alignment (story similarity vs cultural distance)",
                "Negative tau: culturally closer countries get more similar stories.\n\n"
                + plots.md_table(h, al_rows),
                plots.html_table(h, al_rows) + heat,
            )
        )
        if "clip" in m:
            c = m["clip"]
            ks = list(c["recall_within_nationality"])
            rows = [
                [f"R@{k}", c["recall_within_nationality"][k], c["recall_across_nationalities"][k]] for k in ks
            ]
            h = ["", "within nationality", "across nationalities"]
            body = f"Mean CLIPScore {plots.fmt(c['clipscore_mean'])} over {c['num_images']} images.\n\n"
            bars = plots.bar_chart(
                list(c["clipscore_by_nationality"]),
                list(c["clipscore_by_nationality"].values()),
                "CLIPScore by nationality",
            )
            sections.append(
                (
                    f"{model}: CLIPScore and image -> story retrieval",
                    body + plots.md_table(h, rows),
                    f"<p>{body}</p>" + plots.html_table(h, rows) + bars,
                )
            )
    report.write_report(out_dir, "analysis", "stories: cultural adaptation analysis", sections)


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
