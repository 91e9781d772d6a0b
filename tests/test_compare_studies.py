"""`cultengine compare` on values and stories runs: paired values differences, stories alignment side by side,
refusals naming the difference."""

import json

import pytest

from cultengine import compare
from cultengine.cli import main
from cultengine.outputs import ChoiceScore, ScoreOutput
from cultengine.studies import stories, values

TOPICS = {f"q{i}": ("family", "work", "religion")[i % 3] for i in range(12)}
COUNTRIES = ["Japan", "Peru", "Kenya", "France"]


class Scorer:
    """Option log-likelihoods from a fixed rule: `sharp` puts its mass on option 1, else uniform."""

    def __init__(self, sharp: bool):
        self.sharp = sharp

    def score(self, requests, use_tqdm=False):
        return [
            ScoreOutput(
                i,
                [
                    ChoiceScore(c, (0.0 if k == 0 or not self.sharp else -5.0), 1, False)
                    for k, c in enumerate(r["choices"])
                ],
            )
            for i, r in enumerate(requests)
        ]


def _values_inputs(tmp_path):
    items = {q: values.Item(q, f"question {q}?", ["a", "b", "c"], t) for q, t in TOPICS.items()}
    human = {(q, c): [0.8, 0.15, 0.05] for q in items for c in COUNTRIES}  # people mostly answer option 1
    return items, human


def test_values_runs_compared_with_paired_differences(tmp_path):
    items, human = _values_inputs(tmp_path)
    for name, sharp in (("sharp", True), ("flat", False)):
        values.run(Scorer(sharp), items, human, {}, tmp_path / name, model_name=name)
    res = compare.compare([tmp_path / "sharp", tmp_path / "flat"])
    assert res["kind"] == "values" and res["models"] == ["sharp", "flat"] and res["prompts"] == 48
    overall = next(t for t in res["paired"][0]["tests"] if t["group"] == "text|all")
    # the sharp model matches the human distribution better on every prompt: a positive, significant difference
    assert overall["value"] > 0 and overall["low"] > 0 and overall["p"] < 0.01 and overall["clusters"] == 12
    family = res["table"]["sharp"]["text|family"]
    assert family["n"] == 16 and family["low"] <= family["value"] <= family["high"]
    assert main(["compare", str(tmp_path / "sharp"), str(tmp_path / "flat"), "--out", str(tmp_path / "c")]) == 0
    assert "Paired: A = sharp, B = flat" in (tmp_path / "c" / "compare.md").read_text()
    assert (tmp_path / "c" / "compare.csv").read_text().startswith("model,condition,topic,n,js_similarity")


def test_values_runs_on_different_prompts_are_refused(tmp_path):
    items, human = _values_inputs(tmp_path)
    values.run(Scorer(True), items, human, {}, tmp_path / "a", model_name="a")
    fewer = {k: v for k, v in human.items() if k[1] != "Kenya"}
    values.run(Scorer(True), items, fewer, {}, tmp_path / "b", model_name="b")
    with pytest.raises(compare.Incomparable, match="different prompts: 12 only in the first"):
        compare.compare([tmp_path / "a", tmp_path / "b"])


NATS = ["Japanese", "German", "Peruvian", "Kenyan", "French"]


def _stories_run(tmp_path, name, nationalities=NATS):
    run = tmp_path / name
    run.mkdir()
    config = {
        "study": "stories",
        "model": name,
        "concepts": ["rain"],
        "images": ["a.png"],
        "nationalities": nationalities,
        "temperatures": [0.7],
        "samples": 2,
        "max_tokens": 32,
        "top_p": 0.95,
        "seed": 0,
        "template": stories.TEMPLATE,
    }
    (run / "config.json").write_text(json.dumps(config))
    recs = [
        {
            "id": f"{n}|{k}",
            "image": "a.png",
            "concept": "rain",
            "nationality": n,
            "model": name,
            "text": f"{name} story {n} number {k} " + "word " * (len(n) + k),
        }
        for n in nationalities
        for k in range(2)
    ]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    culture = tmp_path / "culture.csv"
    culture.write_text(
        "ctr,country,Demonym,dim\n" + "".join(f"c{i},C{i},{n},{i * 7 % 5}\n" for i, n in enumerate(NATS))
    )
    stories.analyze([run], hofstede=culture, permutations=199)
    return run


def test_stories_runs_compared_and_refused(tmp_path):
    a, b = _stories_run(tmp_path, "m1"), _stories_run(tmp_path, "m2")
    res = compare.compare([a, b])
    assert res["kind"] == "stories" and res["models"] == ["m1", "m2"]
    assert all(al[0]["permutations"] == 199 and 0 < al[0]["p"] <= 1 for al in res["alignment"].values())
    assert "eta_squared" in res["lexical"]["m1"]["length_words"]
    compare.write(res, tmp_path / "out")
    assert "Mantel p" in (tmp_path / "out" / "compare.md").read_text()
    other = _stories_run(tmp_path, "m3", NATS[:4])
    with pytest.raises(compare.Incomparable, match="differ in nationalities"):
        compare.compare([a, other])
    (a / "analysis.json").unlink()
    with pytest.raises(compare.Incomparable, match="analyze stories"):
        compare.compare([a, b])


def test_runs_of_different_kinds_are_refused(tmp_path):
    items, human = _values_inputs(tmp_path)
    values.run(Scorer(True), items, human, {}, tmp_path / "v", model_name="v")
    s = _stories_run(tmp_path, "s")
    with pytest.raises(compare.Incomparable, match="different kinds"):
        compare.compare([tmp_path / "v", s])
    with pytest.raises(compare.Incomparable, match="not a finished"):
        compare.compare([tmp_path / "v", tmp_path])
