"""The study suites' bookkeeping (requests, resume, metrics, drops, reports) with a scripted stand-in
engine, so the expected numbers can be worked out by hand. The real-engine runs are in
test_studies_e2e.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cultengine.outputs import ChoiceScore, GenerationOutput, Sample, ScoreOutput
from cultengine.studies import culture, ground, stats, stories, values


def _text(req: dict) -> str:
    content = req["messages"][0]["content"]
    return " ".join(c["text"] for c in content if c["type"] == "text")


def _has_image(req: dict) -> bool:
    return any(c["type"] == "image" for c in req["messages"][0]["content"])


class ScriptedEngine:
    """score: logprobs from `score_fn(request) -> list[float]`; generate: text from `gen_fn(request, k)`."""

    def __init__(self, score_fn=None, gen_fn=None):
        self.score_fn, self.gen_fn = score_fn, gen_fn
        self.scored, self.generated = 0, 0

    def score(self, requests, use_tqdm=True):
        self.scored += len(requests)
        out = []
        for i, r in enumerate(requests):
            lps = zip(r["choices"], self.score_fn(r), strict=True)
            out.append(ScoreOutput(i, [ChoiceScore(c, lp, 1, False) for c, lp in lps]))
        return out

    def generate(self, requests, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(requests)
        self.generated += len(requests)
        return [
            GenerationOutput(i, [1, 2, 3], [Sample(self.gen_fn(r, k), [7] * 5, "stop", [0.0] * 5) for k in range(p.n)])
            for i, (r, p) in enumerate(zip(requests, params, strict=False))
        ]

    def stats(self):
        return {"prefix_cache_hit_tokens": 10 * self.generated, "prefill_tokens_computed": 3 * self.generated}


# ------------------------------------------------------------------------------------------------ values
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_values_metrics_and_resume(tmp_path):
    items = _write_jsonl(
        tmp_path / "items.jsonl",
        [
            {"id": "q1", "question": "Is work important?", "options": ["yes", "no"], "topic": "work"},
            {"id": "q2", "question": "Is family important?", "options": "very|rather|not", "topic": "family"},
        ],
    )
    (tmp_path / "human.csv").write_text(
        'item_id,country,distribution\nq1,Japan,"[1, 0]"\nq2,Japan,1|1|2\nq1,Peru,3|1\n'
    )
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "images.csv").write_text("country,category,image\nJapan,food,img.png\n")
    it = values.load_items(items)
    human = values.load_human(tmp_path / "human.csv", it)
    assert human[("q2", "Japan")] == [0.25, 0.25, 0.5] and human[("q1", "Peru")] == [0.75, 0.25]
    imgs = values.load_images(tmp_path / "images.csv")
    assert imgs == {"Japan": [("food", str(tmp_path / "img.png"))]}

    # text-only: uniform over the options; with an image: all mass on option 1
    def score_fn(req):
        assert "Japan" in _text(req) or "Peru" in _text(req)
        return [0.0] + [-200.0 if _has_image(req) else 0.0] * (len(req["choices"]) - 1)

    eng = ScriptedEngine(score_fn)
    s = values.run(eng, it, human, imgs, tmp_path / "run")
    assert eng.scored == 5  # 3 text prompts + 2 Japan image prompts
    # q1/Japan: text (.5,.5) vs (1,0): JS = 0.3112781 (worked in test_studies_stats); image (1,0): JS = 0
    cell = {(r["topic"], r["category"]): r for r in s["image_minus_text"]}
    assert cell[("work", "food")]["delta"] == pytest.approx(0.3112781, abs=1e-6)
    # q2/Japan: text (1/3,1/3,1/3) vs (1/4,1/4,1/2); image (1,0,0) vs the same; independent arithmetic:
    h, t, i = np.array([0.25, 0.25, 0.5]), np.ones(3) / 3, np.array([1.0, 0, 0])

    def js(p, q):
        m = (p + q) / 2
        kl = lambda a: sum(x * math.log2(x / y) for x, y in zip(a, m, strict=False) if x > 0)  # noqa: E731
        return (kl(p) + kl(q)) / 2

    assert cell[("family", "food")]["delta"] == pytest.approx(js(t, h) - js(i, h), abs=1e-9)
    assert s["num_records"] == 5 and s["num_errors"] == 0
    assert (tmp_path / "run" / "report.html").read_text().count("<svg") >= 3
    assert "Where images help and hurt" in (tmp_path / "run" / "report.md").read_text()
    # resume: nothing is scored twice
    eng2 = ScriptedEngine(score_fn)
    values.run(eng2, it, human, imgs, tmp_path / "run")
    assert eng2.scored == 0


def test_values_rejects_bad_distribution(tmp_path):
    items = _write_jsonl(tmp_path / "items.jsonl", [{"id": "q", "question": "?", "options": ["a", "b"]}])
    _write_jsonl(tmp_path / "h.jsonl", [{"item_id": "q", "country": "X", "distribution": [1, 2, 3]}])
    with pytest.raises(ValueError, match="does not match"):
        values.load_human(tmp_path / "h.jsonl", values.load_items(items))


# ------------------------------------------------------------------------------------------------ culture
def test_culture_tables_and_default_nationalities():
    nats = culture.default_nationalities()
    assert len(nats) == 42 and len({n.demonym for n in nats}) == 42
    assert all(n.country is not None for n in nats)
    hof = culture.CultureTable.read(culture.HOFSTEDE_CSV, "hofstede")
    # "Malaysian" finds the "Malaysia" row (demonym "Malay" there); "South Korean" the "Korea South" row
    assert hof.keys[hof.find(culture.Nationality("Malaysian"))][1] == "Malaysia"
    found, d, lacking = hof.distances(
        [culture.Nationality(x) for x in ("Japanese", "German", "Nigerian")], complete_rows=True
    )
    assert lacking == ["Nigerian"]  # #NULL! dimensions
    # Japan 54,46,95,92,88,42 ; Germany 35,67,66,65,83,40: diffs 19,-21,29,27,5,2
    assert d[0, 1] == pytest.approx(math.sqrt(19**2 + 21**2 + 29**2 + 27**2 + 5**2 + 2**2))
    wvs = culture.CultureTable.read(culture.WVS_CSV, "wvs").select(culture.wvs_columns())
    assert len(wvs.columns) == 250
    found, d, lacking = wvs.distances(nats, complete_rows=False, standardize=True)
    assert set(lacking) == {"French", "Italian", "Spanish", "Swedish", "Indian"}
    assert d.shape == (37, 37) and not np.isnan(d).any()


def test_parse_nationalities(tmp_path):
    assert [n.demonym for n in culture.parse_nationalities("Thai, Kenyan")] == ["Thai", "Kenyan"]
    (tmp_path / "n.txt").write_text("# mine\nPeruvian\n\nGhanaian\n")
    assert [n.demonym for n in culture.parse_nationalities(str(tmp_path / "n.txt"))] == [
        "Peruvian",
        "Ghanaian",
    ]


# ------------------------------------------------------------------------------------------------ stories
WORDS = {
    "Japanese": "sushi cherry blossom kimono",
    "Korean": "kimchi hanbok",
    "German": "pretzel forest castle",
    "Dutch": "tulip windmill bicycle canal",
}


def _story(req, k):
    demonym = _text(req).split(" for a ")[1].split(" child")[0]
    extra = " ".join(["and"] * (3 * len(demonym)))  # lengths differ by nationality (a stop word)
    return f"Once there was a child. {WORDS.get(demonym, 'river')} {extra} story {k}"


def test_stories_run_resume_and_analysis(tmp_path):
    imgs = []
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
        imgs.append(str(tmp_path / name))
    nats = culture.parse_nationalities("Japanese,German,Dutch,Nigerian")
    eng = ScriptedEngine(gen_fn=_story)
    s = stories.run(eng, ["rain", "a festival"], imgs, nats, [0.3, 0.7], 2, tmp_path / "run", model_name="m")
    assert s["requests_this_run"] == 2 * 2 * 2 * 4 and s["stories_total"] == 64
    assert s["prefill_tokens_saved"] == 10 * 32
    recs = list(stories.ResultLog(tmp_path / "run" / "results.jsonl").read())
    # same seed for every nationality of a cell: the cue is the only difference
    assert stories.request_seed(0, "a.png", "rain", 0.3) == stories.request_seed(0, "a.png", "rain", 0.3)
    assert {r["nationality"] for r in recs} == {"Japanese", "German", "Dutch", "Nigerian"}
    eng2 = ScriptedEngine(gen_fn=_story)
    assert (
        stories.run(eng2, ["rain", "a festival"], imgs, nats, [0.3, 0.7], 2, tmp_path / "run")["requests_this_run"] == 0
        and eng2.generated == 0
    )

    res = stories.analyze([tmp_path / "run"])  # the packaged Hofstede and WVS tables by default
    m = res["models"]["m"]
    # story length is a function of the nationality alone: SSW = 0, F = inf, p = 0
    lex = m["lexical"]["length_words"]["anova"]
    assert lex["df_between"] == 3 and lex["p"] == pytest.approx(0.0, abs=1e-12)
    terms = {n: [t for t, _ in v] for n, v in m["distinctive_terms"].items()}
    assert set(terms["Japanese"][:4]) == {"sushi", "cherry", "blossom", "kimono"}
    hof, wvs = m["alignment"]
    assert hof["lacking"] == ["Nigerian"] and hof["pairs"] == 3
    assert set(wvs["lacking"]) == set() and wvs["pairs"] == 6
    assert "unavailable" not in res["clip"] and "not requested" in res["clip"]
    html = (tmp_path / "run" / "analysis.html").read_text()
    assert "<svg" in html and "Kendall" in html


def test_stories_clip_metrics_with_stand_in_embeddings():
    # 2 images x 2 nationalities, one story each; embeddings chosen so each story is nearest its image
    recs = [dict(image=i, nationality=n, text=f"{i}{n}") for i in ("x", "y") for n in ("A", "B")]
    emb = {"x": [1.0, 0.0], "y": [0.0, 1.0], "xA": [1, 0.1], "xB": [1, 0.2], "yA": [0.1, 1], "yB": [-0.1, 1]}

    class Clip:
        def encode_images(self, ims):
            return stats.cosine_rows(np.array([emb[i] for i in ims]))

        def encode_text(self, texts):
            return stats.cosine_rows(np.array([emb[t] for t in texts]))

    c = stories.clip_metrics(Clip(), recs, [culture.Nationality("A"), culture.Nationality("B")], ks=(1,))
    assert c["recall_within_nationality"][1] == 1.0
    # image x's nearest story is xA: the (x, A) query hits, (x, B) misses; image y's nearest is yB
    assert c["recall_across_nationalities"][1] == 0.5
    assert c["clipscore_by_nationality"]["A"] == pytest.approx(
        100 * np.mean([1 / math.hypot(1, 0.1), 1 / math.hypot(1, 0.1)])
    )


# ------------------------------------------------------------------------------------------------ ground
def test_ground_stages_drops_and_resume(tmp_path):
    Image.new("RGB", (8, 8), "green").save(tmp_path / "img.png")
    _write_jsonl(
        tmp_path / "ents.jsonl",
        [
            {
                "id": "e1",
                "entity": "sushi",
                "country": "Japan",
                "image": "img.png",
                "properties": {"country_of_origin": "Japan", "made_from": "rice"},
            },
            {
                "id": "e2",
                "entity": "Japan rice cake",
                "country": "Japan",
                "image": "img.png",
                "properties": "country_of_origin=Japan",
            },  # the template names the answer: dropped at stage 1
            {
                "id": "e3",
                "entity": "haggis",
                "country": "Scotland",
                "image": "img.png",
                "properties": {"cuisine": "Scottish"},
            },  # relevance below threshold: dropped at stage 3
            {
                "id": "e4",
                "entity": "kilt",
                "country": "Scotland",
                "properties": {"made_from": "wool"},
            },  # no image
        ],
    )

    def gen(req, k):
        q = _text(req).split("Question: ")[1]
        origin = "country" in q.lower() or "país" in q
        return "Where is this rice dish from? It is from JAPAN!" if "sushi" in q and origin else f"Please: {q}"

    def score(req):
        return [0.0, 0.0] if "haggis" in _text(req) else [0.0, -2.0]  # P(yes) = 0.5 or 0.881

    eng = ScriptedEngine(score, gen)
    s = ground.run(eng, tmp_path / "ents.jsonl", tmp_path / "run", ["en", "es"], threshold=0.6, chunk_size=2)
    # rows: e1 2 props x 2 langs = 4; e2 2; e3 2; e4 2 -> 10
    assert s["rows"] == 10
    # e2 (en, es): template names "Japan" -> stage 1; e1 country_of_origin (en, es): the rewording names
    # "JAPAN!" -> stage 2 leak; e3 (P(yes) = 0.5 < 0.6) and e4 (no image) -> stage 3; e1 made_from kept
    assert s["drop_reasons"] == {"irrelevant": 2, "leak": 2, "no_image": 2, "template_leak": 2}
    assert s["dropped_per_stage"] == {"stage1": 2, "stage2": 2, "stage3": 4}
    assert s["kept"] == 2 and s["parquet"]
    rows = list(ground.ResultLog(tmp_path / "run" / "ground.jsonl").read())
    kept = [r for r in rows if r["kept"]]
    assert {r["property"] for r in kept} == {"made_from"}
    assert all(r["stage3"]["p_yes"] == pytest.approx(1 / (1 + math.exp(-2))) for r in kept)
    assert all(set(r) >= {"stage1", "stage2", "stage3"} for r in kept)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "run" / "ground.parquet").num_rows == 2
    eng2 = ScriptedEngine(score, gen)
    assert ground.run(eng2, tmp_path / "ents.jsonl", tmp_path / "run", ["en", "es"])["rows_this_run"] == 0
    assert eng2.generated == 0 and eng2.scored == 0


def test_leak_normalisation():
    assert ground.leaks("São Paulo", "Is it in SAO-PAULO?")
    assert not ground.leaks("Rome", "A romantic place")  # word boundaries
    assert ground.parse_properties('{"a": "1"}') == {"a": "1"}
    assert ground.parse_properties("a=1|b=x=y") == {"a": "1", "b": "x=y"}
