"""ground: the CulturalGround pipeline -- culturally grounded VQA rows from entity records.

Input records (CSV/JSONL/parquet, streamed): `id` (optional), `entity, country, language` (optional),
`properties` (an object, a JSON object in a string, or `key=value|key=value`), `image`.

Stage 1  template questions: for every property with a template in every requested language, the
         template's question with the property value as the answer. A template that already contains
         the answer is dropped ("template_leak").
Stage 2  refinement by generation: the model rewords the question fluently; a rewording that contains the
         answer (normalised substring match) or is empty is dropped ("leak", "empty").
Stage 3  relevance by scoring: "Does this image show {entity}? Answer yes or no." -> P(yes) normalised over
         {yes, no}; a row is kept if P(yes) >= threshold ("irrelevant", or "no_image" without an image).
         Scored once per record.

Output: `ground.jsonl`, append-only, one line per row with the provenance of every stage, `kept` and
`dropped_at`/`drop_reason` -- dropped rows are written too, so a re-run skips every row already decided;
`ground.parquet` (kept rows, if pyarrow is installed) and `summary.json` (counts dropped per stage) are
rebuilt from it at the end. Records are processed in chunks, so memory holds one chunk plus the done ids
(with `--ray-replicas`, the undecided stage-1 rows are listed first and the chunks spread over Ray engine
replicas; this process alone writes `ground.jsonl`, so a killed run still resumes with each row decided once).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from functools import partial
from importlib import resources
from pathlib import Path

from ..console import bar, resume_note
from ..paths import named_by_data_file
from ..replicas import Replicas
from ..runlog import ResultLog, write_json
from .io import chunks, iter_records
from .stats import softmax


def load_templates(path: str | Path | None = None) -> dict:
    text = (
        Path(path).read_text(encoding="utf-8-sig")
        if path
        else resources.files(__package__).joinpath("data/ground_templates.json").read_text(encoding="utf-8")
    )
    t = json.loads(text)
    for key in ("properties", "refine_prompt", "relevance_prompt"):
        if key not in t:
            raise ValueError(f"templates file {path or 'default'}: missing {key!r}")
    return t


def normalize(text: str) -> str:
    """Case-folded, accents stripped, punctuation turned into spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", str(text).casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def leaks(answer: str, text: str) -> bool:
    """The normalised answer occurs in the normalised text, on word boundaries."""
    a = normalize(answer)
    return bool(a) and f" {a} " in f" {normalize(text)} "


def parse_properties(value) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items() if v not in (None, "")}
    text = str(value or "").strip()
    if text.startswith("{"):
        return parse_properties(json.loads(text))
    pairs = (p.split("=", 1) for p in text.split("|") if "=" in p)
    return {k.strip(): v.strip() for k, v in pairs if v.strip()}


def record_id(rec: dict, n: int) -> str:
    """A record's id, or the line number `n` that names it when it has none."""
    return str(rec.get("id") or f"line{n}")


def check_languages(templates: dict, languages: list[str]) -> None:
    """Every requested language has a template (an unknown one would give no rows, and no error)."""
    known = {lang for by_lang in templates["properties"].values() for lang in by_lang}
    if unknown := [lang for lang in languages if lang not in known]:
        raise ValueError(
            f"--languages: no template in {', '.join(map(repr, unknown))} (the templates have: "
            f"{', '.join(sorted(known)) or 'none'})"
        )


def stage1(rec: dict, n: int, templates: dict, languages: list[str]) -> list[dict]:
    """Template rows of one input record (its line number `n` names it when it has no id)."""
    rid = record_id(rec, n)
    entity, country = str(rec.get("entity", "")), str(rec.get("country", ""))
    image = rec.get("image") or None
    rows = []
    for prop, value in parse_properties(rec.get("properties")).items():
        for lang in languages:
            for k, tmpl in enumerate(templates["properties"].get(prop, {}).get(lang, [])):
                question = tmpl.format(entity=entity, country=country, value=value)
                row = dict(
                    id=f"{rid}|{prop}|{lang}|{k}",
                    record_id=rid,
                    entity=entity,
                    country=country,
                    record_language=rec.get("language"),
                    language=lang,
                    property=prop,
                    answer=value,
                    image=image,
                    stage1=dict(template=tmpl, question=question),
                    kept=False,
                )
                if leaks(value, question):
                    row.update(dropped_at=1, drop_reason="template_leak")
                rows.append(row)
    return rows


def run(
    engine,
    input_path: str | Path,
    out_dir: str | Path,
    languages: list[str],
    templates: dict | None = None,
    threshold: float = 0.5,
    chunk_size: int = 1000,
    max_tokens: int = 64,
    model_name: str = "",
    quiet: bool = False,
    media_root: str | Path | None = None,
) -> dict:
    """Run the three stages over every row not yet decided in `out_dir/ground.jsonl` (flushed after every chunk
    of `chunk_size` records, with a progress bar of rows on a terminal unless `quiet`), then summarise.
    `engine` is an `Engine`, or `replicas.Replicas` (each chunk then goes to one of its Ray replicas)."""
    templates = templates or load_templates()
    check_languages(templates, languages)
    if not 0 <= threshold <= 1:  # also NaN: every row would be dropped as irrelevant
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    # Two records under one id would share row ids: the second's rows skipped as done, its image's relevance
    # taken from the first's. Checked before anything is written.
    first_line: dict[str, int] = {}  # record id -> the line it was first seen on
    for n, rec in enumerate(iter_records(input_path), 1):
        rid = record_id(rec, n)
        if rid in first_line:
            raise ValueError(
                f"{input_path}: record {n} has the id {rid!r} of record {first_line[rid]}; record ids must be unique"
            )
        first_line[rid] = n
    out_dir = Path(out_dir)
    log = ResultLog(out_dir / "ground.jsonl")
    write_json(
        out_dir / "config.json",
        dict(
            study="ground",
            model=model_name,
            input=str(input_path),
            languages=languages,
            threshold=threshold,
            templates=templates,
        ),
    )
    new_rows = 0
    # a first pass over the records (no model): how many rows there are, and how many an earlier run decided
    total = done = 0
    for n, rec in enumerate(iter_records(input_path), 1):
        ids = [r["id"] for r in stage1(rec, n, templates, languages)]
        total, done = total + len(ids), done + sum(i in log.done for i in ids)
    resume_note(done, total, "rows")

    def pending():  # per chunk of records: its stage-1 rows not yet decided, their images resolved
        for chunk in chunks(enumerate(iter_records(input_path), 1), chunk_size):
            rows = [r for n, rec in chunk for r in stage1(rec, n, templates, languages) if r["id"] not in log.done]
            for r in rows:
                if r["image"]:
                    try:  # a record's image stays inside the input's folder (or the allowed media path)
                        r["image"] = str(named_by_data_file(input_path, r["image"], media_root))
                    except ValueError as e:
                        r.update(dropped_at=3, drop_reason="error", stage3=dict(error=f"image {e}"))
            if rows:
                yield rows

    work = partial(decide, templates=templates, threshold=threshold, max_tokens=max_tokens, model_name=model_name)
    if isinstance(engine, Replicas):  # each chunk to a Ray replica; this process writes what comes back
        decided = (rows for results, _ in engine.map(list(pending()), work, 1) for rows in results)
    else:
        decided = (work(engine, [rows])[0] for rows in pending())
    with log, bar(total, initial=done, unit="row", desc="ground", quiet=quiet) as progress:
        for rows in decided:
            log.write(rows)
            new_rows += len(rows)
            progress.update(len(rows))
    summary = summarize(log)
    summary["rows_this_run"] = new_rows
    write_json(out_dir / "summary.json", summary)
    return summary


def decide(
    engine, chunks_of_rows: list[list[dict]], templates: dict, threshold: float, max_tokens: int, model_name: str
) -> list[list[dict]]:
    """Stages 2 and 3 over each chunk's stage-1 rows (in place; the chunks returned): the `replicas.Work` a
    local engine or a Ray replica runs."""
    from ..sampling import SamplingParams

    lang_names = templates.get("languages", {})
    refine = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"])
    rows = [r for chunk in chunks_of_rows for r in chunk]
    live = [r for r in rows if "dropped_at" not in r]
    # stage 2: fluent rewording without the answer
    prompts = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "text",
                            "text": templates["refine_prompt"].format(
                                language=lang_names.get(r["language"], r["language"]),
                                answer=r["answer"],
                                question=r["stage1"]["question"],
                                entity=r["entity"],
                                country=r["country"],
                            ),
                        }
                    ],
                }
            ]
        }
        for r in live
    ]
    outs = engine.generate(prompts, refine, use_tqdm=False) if live else []
    for r, o in zip(live, outs, strict=True):
        text = o.text.strip().strip('"').strip()
        r["stage2"] = dict(question=text, model=model_name, error=o.error)
        if o.error or not text:
            r.update(dropped_at=2, drop_reason="error" if o.error else "empty")
        elif leaks(r["answer"], text):
            r.update(dropped_at=2, drop_reason="leak")
    live = [r for r in live if "dropped_at" not in r]
    # stage 3: relevance of the image to the entity, once per record
    for r in live:
        if not r["image"]:
            r.update(dropped_at=3, drop_reason="no_image")
    live = [r for r in live if "dropped_at" not in r]
    firsts = list({r["record_id"]: r for r in live}.values())
    scored = (
        engine.score(
            [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": r["image"]},
                                {
                                    "type": "text",
                                    "text": templates["relevance_prompt"].format(
                                        entity=r["entity"], country=r["country"]
                                    ),
                                },
                            ],
                        }
                    ],
                    "choices": ["yes", "no"],
                }
                for r in firsts
            ],
            use_tqdm=False,
        )
        if firsts
        else []
    )
    p_yes = {
        r["record_id"]: (None, s.error) if s.error else (softmax([c.logprob for c in s.choices])[0], None)
        for r, s in zip(firsts, scored, strict=True)
    }
    for r in live:
        p, err = p_yes[r["record_id"]]
        r["stage3"] = dict(p_yes=p, threshold=threshold, error=err)
        if err:
            r.update(dropped_at=3, drop_reason="error")
        elif p < threshold:
            r.update(dropped_at=3, drop_reason="irrelevant")
        else:
            r["kept"] = True
    return chunks_of_rows


def summarize(log: ResultLog, parquet: bool = True) -> dict:
    """Counts per stage from the log (streamed); the kept rows go to ground.parquet if pyarrow is there."""
    total, kept = 0, 0
    dropped: Counter = Counter()
    reasons: Counter = Counter()
    writer = None
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        parquet = False
    batch = []

    def flush():
        nonlocal writer
        table = pa.Table.from_pylist([_flat(r) for r in batch])
        if writer is None:
            writer = pq.ParquetWriter(log.path.with_suffix(".parquet"), table.schema)
        writer.write_table(table.cast(writer.schema))
        batch.clear()

    for r in log.read():
        total += 1
        if r.get("kept"):
            kept += 1
            if parquet:
                batch.append(r)
                if len(batch) >= 10000:
                    flush()
        else:
            dropped[f"stage{r.get('dropped_at')}"] += 1
            reasons[r.get("drop_reason")] += 1
    if parquet and batch:
        flush()
    if writer is not None:
        writer.close()
    return dict(
        rows=total,
        kept=kept,
        dropped_per_stage=dict(sorted(dropped.items())),
        drop_reasons=dict(sorted(reasons.items())),
        parquet=bool(writer),
    )


def _flat(r: dict) -> dict:
    """A kept row with a fixed set of string/number columns for parquet (stage details as JSON)."""
    return dict(
        id=r["id"],
        record_id=r["record_id"],
        entity=r["entity"],
        country=r["country"],
        language=r["language"],
        property=r["property"],
        image=r["image"],
        answer=r["answer"],
        question=r["stage2"]["question"],
        template_question=r["stage1"]["question"],
        p_yes=float(r["stage3"]["p_yes"]),
        provenance=json.dumps({k: r[k] for k in ("stage1", "stage2", "stage3")}, ensure_ascii=False),
    )
