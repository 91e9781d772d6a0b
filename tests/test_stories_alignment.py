"""`analyze stories` tests story similarity against cultural distance with a Mantel test: a planted
relation is found, unrelated stories are not, and a demo-checkpoint run carries the note."""

import json
import random

import numpy as np
import pytest

from cultengine import stats
from cultengine.studies import stats as study_stats
from cultengine.studies import stories

NATS = [
    "Japanese",
    "German",
    "Peruvian",
    "Kenyan",
    "French",
    "Brazilian",
    "Indian",
    "Chinese",
    "Mexican",
    "Egyptian",
    "Swedish",
    "Nigerian",
]
VOCAB = [f"word{chr(97 + i)}" for i in range(24)]


def _culture(tmp_path, positions):
    path = tmp_path / "culture.csv"
    rows = [f"c{i},Country{i},{n},{positions[n]:.3f}" for i, n in enumerate(NATS)]
    path.write_text("ctr,country,Demonym,dim\n" + "\n".join(rows) + "\n")
    return path


def _run(tmp_path, name, text_of, model="m"):
    run = tmp_path / name
    run.mkdir()
    recs = [
        {
            "id": f"{n}|{k}",
            "image": "a.png",
            "concept": "rain",
            "nationality": n,
            "temperature": 0.7,
            "model": model,
            "text": text_of(n, k),
        }
        for n in NATS
        for k in range(6)
    ]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def test_planted_relation_is_significant_and_unrelated_stories_are_not(tmp_path):
    rng = random.Random(0)
    positions = {n: rng.random() for n in NATS}
    culture = _culture(tmp_path, positions)

    def near(n, k):  # words near the nationality's position on the one cultural dimension
        centre = positions[n] * (len(VOCAB) - 1)
        r = random.Random(f"{n}{k}")
        return " ".join(VOCAB[min(len(VOCAB) - 1, max(0, round(centre + r.gauss(0, 1.5))))] for _ in range(30))

    planted = stories.analyze([_run(tmp_path, "planted", near)], hofstede=culture, wvs=None, permutations=1999)
    (a,) = planted["models"]["m"]["alignment"]
    assert a["tau"] < -0.3 and a["p"] < 0.01 and a["pairs"] == 66 and a["permutations"] == 1999
    assert "Mantel" in a["test"]
    # the reported p is the Mantel test of the analysis' own matrices
    sim = np.array(planted["models"]["m"]["similarity"])
    order = planted["models"]["m"]["nationalities"]
    pos = np.array([positions[n] for n in order])[:, None]
    dist = np.abs(pos - pos.T)
    assert stats.mantel(sim, dist, permutations=1999).p == pytest.approx(a["p"])

    def unrelated(n, k):
        r = random.Random(f"u{n}{k}")
        return " ".join(r.choice(VOCAB) for _ in range(30))

    null = stories.analyze([_run(tmp_path, "null", unrelated)], hofstede=culture, wvs=None, permutations=1999)
    assert null["models"]["m"]["alignment"][0]["p"] > 0.05
    anova = null["models"]["m"]["lexical"]["type_token_ratio"]["anova"]
    assert 0 <= anova["eta_squared"] <= 1 and anova["omega_squared"] <= anova["eta_squared"]


def test_demo_checkpoint_note(tmp_path):
    run = _run(tmp_path, "demo", lambda n, k: f"a story {n} {k}", model="demo")
    res = stories.analyze([run], permutations=99)
    assert res["models"]["demo"]["demo"] is True
    md = (run / "analysis.md").read_text()
    assert "demo checkpoint (random weights)" in md and "## Run" in md and "eta^2" in md


def test_clipscore_intervals_resample_images(tmp_path):
    emb = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [0.7, 0.7]}

    class Clip:  # a story's embedding leans to its image's by how long the story is
        def encode_images(self, ims):
            return study_stats.cosine_rows(np.array([emb[i] for i in ims]))

        def encode_text(self, texts):
            return study_stats.cosine_rows(np.array([np.array(emb[t[0]]) + 0.1 * len(t) for t in texts]))

    recs = [dict(image=i, nationality=n, text=i + "s" * k) for i in "xyz" for n in ("A", "B") for k in range(3)]
    nats = [stories.Nationality("A"), stories.Nationality("B")]
    c = stories.clip_metrics(Clip(), recs, nats, ks=(1,))
    ci = c["clipscore_by_nationality_ci"]["A"]
    assert ci["n"] == 9 and ci["clusters"] == 3 and ci["low"] <= c["clipscore_by_nationality"]["A"] <= ci["high"]
    result = {"tfidf": "t", "clip": "stand-in", "anova": "a", "alignment_test": "m", "models": {}}
    m = {
        "nationalities": ["A", "B"],
        "regions": {"A": "r", "B": "r"},
        "num_stories": 18,
        "similarity": [[1, 0], [0, 1]],
        "lexical": {},
        "distinctive_terms": {"A": [], "B": []},
        "alignment": [],
        "clip": c,
    }
    result["models"]["m"] = m
    stories.write_analysis_report(tmp_path, result)
    assert "CLIPScore by nationality (95 % CI over images)" in (tmp_path / "analysis.html").read_text()
