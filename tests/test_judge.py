"""Open-answer scoring: VQA normalisation, a tiny judge checkpoint through the engine, the report's
judge and English-vs-local sections, and resume after SIGKILL while judging."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench_helpers import bench_args
from cultengine import runlog
from cultengine.bench import judge, langgap
from cultengine.bench.rows import Row
from cultengine.bench.run import RunError, run
from cultengine.outputs import ChoiceScore, GenerationOutput, Sample, ScoreOutput

REPO = Path(__file__).resolve().parents[1]
# question -> (reference answers, the fixed answer the model under test gives)
QA = {
    "What is the capital of Japan?": (["Tokyo"], "tokyo."),
    "How many legs does a spider have?": (["eight", "8"], "Eight"),
    "Which dish is this?": (["nasi goreng"], "The Nasi Goreng"),
    "What instrument is played at this festival?": (["gamelan"], "drums"),
    "What colour is the bride's dress?": (["red"], "a red one"),
    "Where was this photo taken?": (["Lima"], "Peru"),
}


# the tiny checkpoint's context is 256 tokens: the package prompt is too long for it, so the tests use
# this shorter one (the judging prompt is a data file the user can replace)
SHORT_PROMPT = "Q: {{ question }}\nRef: {{ answers | join(' | ') }}\nA: {{ prediction }}\nRight?"


def short_prompt(tmp_path):
    (tmp_path / "judge.jinja").write_text(SHORT_PROMPT)
    return str(tmp_path / "judge.jinja")


def test_vqa_normalize():
    assert judge.vqa_normalize("The Two Dogs.") == "2 dogs"
    assert judge.vqa_normalize("  3.5 kg, about 1,000 grains!") == "3.5 kg about 1000 grains"
    assert judge.vqa_normalize("Crème-brûlée") == "crème brûlée"
    assert judge.normalized_match("An Apple", ["apple"]) and not judge.normalized_match("", ["apple"])
    assert judge.normalized_match("eight", ["8"]) and not judge.normalized_match("eighty", ["8"])


def test_prompt_is_package_data_and_renders():
    assert judge.PROMPT_FILE.is_file()
    row = Row(id="x", question="Which dish?", answer=["nasi goreng", "fried rice"], country="Indonesia")
    req = judge.JudgePrompt.load().request(row, "rice")
    text = req["messages"][0]["content"][0]["text"]
    assert "Which dish?" in text and "nasi goreng | fried rice" in text and "Candidate answer: rice" in text
    assert "in Indonesia" in text and req["choices"] == ["yes", "no"]


def test_verdict_and_agreement():
    out = ScoreOutput(0, [ChoiceScore("yes", -1.0, 1, True), ChoiceScore("no", -2.0, 1, False)])
    v = judge.verdict(out)
    assert v["judge_correct"] is True and v["judge_p_yes"] == pytest.approx(1 / (1 + 2.718281828**-1), 1e-6)
    assert judge.verdict(ScoreOutput(0, [], error="too long")) == {"judge_error": "too long"}
    recs = [
        {"correct": True, "normalized": True, "judge_correct": True, "judge_p_yes": 0.9},
        {"correct": False, "normalized": True, "judge_correct": True, "judge_p_yes": 0.7},
        {"correct": False, "normalized": False, "judge_correct": False, "judge_p_yes": 0.2},
        {"correct": True, "normalized": True, "judge_correct": False, "judge_p_yes": 0.4},
    ]
    a = judge.agreement(recs)
    assert (a["n"], a["agreement_exact_match"], a["agreement_normalized_match"]) == (4, 0.5, 0.75)
    assert a["kappa_exact_match"] == 0.0 and a["mean_p_yes"] == 0.55
    assert (a["judge_says_right_exact_says_wrong"], a["judge_says_wrong_exact_says_right"]) == (1, 1)


class FixedAnswers:
    """The model under test: gives QA's fixed answer to each question (by its text)."""

    def __init__(self):
        self.generated = 0

    def generate(self, requests, params, use_tqdm=False):
        outs = []
        for i, r in enumerate(requests):
            text = r["messages"][0]["content"][-1]["text"]
            pred = next(a for q, (_, a) in QA.items() if q in text)
            outs.append(GenerationOutput(i, [1], [Sample(pred, [5], "stop", [-0.1])]))
            self.generated += 1
        return outs

    def stats(self):
        return {}


def write_open(path, n_copies=1, lang=False):
    with path.open("w", encoding="utf-8") as f:
        for k in range(n_copies):
            for j, (q, (answers, _)) in enumerate(QA.items()):
                rec = {
                    "id": f"q{k}-{j}",
                    "question": q,
                    "answers": answers,
                    "language": ["en", "id"][j % 2],
                    "country": ["Japan", "Indonesia", "Peru"][j % 3],
                }
                f.write(json.dumps(rec) + "\n")
    return path


def test_tiny_judge_on_fixed_answers(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path / "cache"))
    from cultengine.engine import Engine

    data = write_open(tmp_path / "open.jsonl")
    answers = FixedAnswers()
    judges = []

    def make(model, device, dtype):
        if model == str(tiny_llama.resolve()) or Path(model) == tiny_llama:
            judges.append(Engine(str(tiny_llama), device="cpu", dtype="float32"))
            return judges[-1]
        return answers

    out = tmp_path / "run"
    args = bench_args(
        data=[str(data)],
        suite="vqa",
        output_dir=str(out),
        model=str(tmp_path / "m"),
        judge_model=str(tiny_llama),
        judge_prompt=short_prompt(tmp_path),
        batch=4,
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    # answers first, then judging added to the finished run: the answers are not generated again
    assert run(bench_args(**{**vars(args), "judge_model": None}), make_engine=make) == 0
    assert answers.generated == len(QA) and not judges and not (out / judge.JUDGMENTS).exists()
    assert run(args, make_engine=make) == 0
    assert answers.generated == len(QA) and len(judges) == 1
    recs = list(runlog.read(out / "results.jsonl"))
    js = {j["id"]: j for j in runlog.read(out / judge.JUDGMENTS)}
    assert len(recs) == len(js) == len(QA)
    # verdict and probability per sample, from the judge's scores of "yes" and "no" on the judging prompt
    prompt = judge.JudgePrompt.load(short_prompt(tmp_path))
    rows = {r["id"]: r for r in recs}
    direct = judges[0].score(
        [
            prompt.request(
                Row(
                    id=i,
                    question=q,
                    answer=a,
                    country=rows[f"q0-{j}"]["groups"]["country"],
                    language=rows[f"q0-{j}"]["groups"]["language"],
                ),
                p,
            )
            for j, (q, (a, p)) in enumerate(QA.items())
            for i in [f"q0-{j}"]
        ],
        use_tqdm=False,
    )
    for j, d in enumerate(direct):
        rec, v = rows[f"q0-{j}"], js[f"q0-{j}"]
        yes, no = d.choices[0].logprob, d.choices[1].logprob
        assert v["judge_logprobs"] == pytest.approx([yes, no], abs=1e-5)
        assert v["judge_p_yes"] == pytest.approx(1 / (1 + pow(2.718281828459045, no - yes)), abs=1e-5)
        assert rec["judge_correct"] == (v["judge_p_yes"] >= 0.5) and rec["judge_p_yes"] == v["judge_p_yes"]
    s = json.loads((out / "summary.json").read_text())
    assert s["primary_metric"] == "judge_acc" and s["overall"]["n"] == len(QA)
    judged_right = sum(v["judge_correct"] for v in js.values())
    assert s["overall"]["judge_acc"] == pytest.approx(judged_right / len(QA), abs=1e-6)
    # exact (case and punctuation): "tokyo.", "Eight"; normalised adds "The Nasi Goreng" (articles dropped)
    assert s["overall"]["exact_match"] == pytest.approx(2 / 6, abs=1e-6)
    assert s["overall"]["normalized_match"] == pytest.approx(3 / 6, abs=1e-6)
    assert set(s["by"]["language"]) == {"en", "id"} and "judge_acc" in s["by"]["language"]["en"]
    exact = [r["correct"] for r in recs]
    agree = sum(r["judge_correct"] == e for r, e in zip(recs, exact, strict=True)) / len(QA)
    assert s["judge"]["n"] == len(QA) and s["judge"]["agreement_exact_match"] == pytest.approx(agree, abs=1e-6)
    report = (out / "report.md").read_text()
    assert "## Judge" in report and "agreement with exact match" in report and "judge_acc" in report
    # a re-run judges nothing again and builds no judge engine
    assert run(args, make_engine=make) == 0 and len(judges) == 1
    # another judging prompt never mixes its verdicts with these
    (tmp_path / "other.jinja").write_text(SHORT_PROMPT + " (yes/no)")
    with pytest.raises(ValueError, match="another judge model or prompt"):
        run(bench_args(**{**vars(args), "judge_prompt": str(tmp_path / "other.jinja")}), make_engine=make)
    with pytest.raises(RunError, match="use it with --suite vqa"):
        run(bench_args(**{**vars(args), "suite": "mcq"}), make_engine=make)
    # verdicts deleted: the summary and the result lines drop them
    (out / judge.JUDGMENTS).unlink()
    assert run(bench_args(**{**vars(args), "judge_model": None}), make_engine=make) == 0
    assert "judge" not in json.loads((out / "summary.json").read_text())
    assert not any("judge_correct" in r for r in runlog.read(out / "results.jsonl"))


def test_language_gap_table_and_plot():
    recs = []
    for country, en, local in (("Japan", [1, 1, 1, 0], [1, 0, 0, 0]), ("Peru", [1, 0], [1, 1])):
        for lang, vals in (("en", en), ("local", local)):
            recs += [
                {
                    "id": f"{country}-{lang}-{i}",
                    "correct": bool(v),
                    "prompt_lang": lang,
                    "groups": {"country": country, "language": "x"},
                }
                for i, v in enumerate(vals)
            ]
    g = langgap.language_gap(recs, "mcq", "acc")
    assert g["by"]["country"]["Japan"] == {"en": 0.75, "local": 0.25, "n_en": 4, "n_local": 4, "gap": 0.5}
    assert g["by"]["country"]["Peru"]["gap"] == -0.5 and g["overall"]["gap"] == pytest.approx(4 / 6 - 3 / 6, abs=1e-6)
    summary = {"language_gap": g}
    md = "\n".join(langgap.markdown(summary))
    assert "| Japan | 4 | 75.0 | 25.0 | 50.0 |" in md and "| Peru | 2 | 50.0 | 100.0 | -50.0 |" in md
    svg = langgap.plot(summary)
    assert svg.startswith("<svg") and "Japan" in svg and "Peru" in svg
    assert langgap.language_gap([r for r in recs if r["prompt_lang"] == "en"], "mcq", "acc") is None


def _bench(*args):
    return [sys.executable, "-m", "cultengine.cli", "bench", "--device", "cpu", *args]


def test_sigkill_while_judging_resumes_without_regenerating(tmp_path, tiny_llama):
    data = write_open(tmp_path / "open.jsonl", n_copies=8)  # 48 samples
    n = 8 * len(QA)
    env = dict(os.environ, CULTENGINE_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "run"
    cmd = _bench(
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--suite",
        "vqa",
        "--judge-model",
        str(tiny_llama),
        "--judge-prompt",
        short_prompt(tmp_path),
        "--batch",
        "2",
        "--out",
        str(out),
    )
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    judged = out / judge.JUDGMENTS
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if judged.exists() and judged.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "summary.json").exists()
    answers = {r["id"]: r["prediction"] for r in runlog.read(out / "results.jsonl")}
    assert len(answers) == n  # every answer was generated before judging began
    sessions = {r["session"] for r in runlog.read(out / "engine_stats.jsonl")}
    before = sum(1 for _ in runlog.read(judged))
    assert 4 <= before < n
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"judging: {before} of {n} samples already judged, {n - before} to go" in done.stderr
    assert {r["session"] for r in runlog.read(out / "engine_stats.jsonl")} == sessions  # nothing regenerated
    recs = list(runlog.read(out / "results.jsonl"))
    assert {r["id"]: r["prediction"] for r in recs} == answers
    ids = [j["id"] for j in runlog.read(judged)]
    assert len(ids) == len(set(ids)) == n and all("judge_p_yes" in r for r in recs)
    s = json.loads((out / "summary.json").read_text())
    assert s["judge"]["n"] == n and s["primary_metric"] == "judge_acc"


def test_long_answers_get_sentences_and_room(tmp_path, monkeypatch):
    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path / "cache"))
    seen = []

    class Capture(FixedAnswers):
        def generate(self, requests, params, use_tqdm=False):
            seen.extend(
                (r["messages"][0]["content"][-1]["text"], p.max_tokens, p.stop)
                for r, p in zip(requests, params, strict=True)
            )
            return [GenerationOutput(i, [1], [Sample("x", [5], "stop", [-0.1])]) for i in range(len(requests))]

    rows = [
        {"id": "s", "question": "Name the dish.", "answers": ["ugali"], "question_type": "SVQA"},
        {"id": "l", "question": "Describe the dish.", "answers": ["a maize porridge"], "question_type": "LVQA"},
    ]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = bench_args(data=[str(data)], suite="vqa", output_dir=str(tmp_path / "o"), model=str(tmp_path / "m"))
    assert run(args, make_engine=lambda *a: Capture()) == 0
    by_q = {t.split("\n")[0]: (t, n, stop) for t, n, stop in seen}
    assert by_q["Name the dish."][1:] == (32, ["\n"]) and "single word or phrase" in by_q["Name the dish."][0]
    assert by_q["Describe the dish."][1] == 256 and not by_q["Describe the dish."][2]
    assert by_q["Describe the dish."][0].endswith("Answer the question in a few sentences.")
