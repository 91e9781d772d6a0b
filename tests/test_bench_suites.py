import pytest

from cultengine.bench.rows import Row
from cultengine.bench.suites import SuiteConfig, build_requests, normalize, parse_letter, prompt_hash, rotate, score
from cultengine.outputs import ChoiceScore, GenerationOutput, Sample, ScoreOutput

OPTS = ["Japan", "Peru", "Ghana", "India"]


def row(**kw):
    base = dict(id="q1", question="Which country's flag is this?", images=["/x/jpn.png"], options=OPTS, answer=0)
    base.update(kw)
    return Row(**base)


def scored(lps, texts):
    return ScoreOutput(0, [ChoiceScore(t, lp, 1, False) for t, lp in zip(texts, lps, strict=True)])


def gen(text):
    return GenerationOutput(0, [1], [Sample(text, [1], "stop", [0.0])])


def test_normalize_is_multilingual():
    assert normalize("  Tōkyō!! ") == "tōkyō"
    assert normalize("東京。") == "東京"
    assert normalize("ＴＯＫＹＯ") == "tokyo"  # NFKC folds full-width letters
    assert normalize("«Straße»") == "strasse"  # casefold, Unicode punctuation
    assert normalize("नमस्ते।") == "नमस्ते"  # combining vowel signs kept, danda stripped
    assert normalize("القاهرة؟") == "القاهرة"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("B", 1),
        ("(C)", 2),
        ("D.", 3),
        ("B) Peru", 1),
        ("The answer is C.", 2),
        ("Answer: **D**", 3),
        ("I think it is Ghana", 2),
        ("A", 0),
        ("A flag of Japan", 0),
        ("E", None),
        ("A or B", None),
        ("no idea", None),
        ("", None),
        ("Ｂ", 1),
    ],
)
def test_parse_letter(text, expected):
    assert parse_letter(text, OPTS) == expected


def test_requests_chat_messages_and_rotations():
    cfg = SuiteConfig("mcq", "loglik", circular=True)
    reqs = build_requests(row(), cfg)
    assert len(reqs) == 4
    content = reqs[1]["messages"][0]["content"]
    assert content[0] == {"type": "image", "image": "/x/jpn.png"}
    assert "A. Peru" in content[1]["text"] and reqs[1]["choices"] == rotate(OPTS, 1)
    gen_req = build_requests(row(images=[]), SuiteConfig("mcq", "generate"))
    assert "choices" not in gen_req[0] and len(gen_req[0]["messages"][0]["content"]) == 1


def test_template_override_and_prompt_hash():
    cfg = SuiteConfig("mcq", "loglik", template="Q: {{ question }} [{{ options|join('/') }}]")
    assert (
        build_requests(row(), cfg)[0]["messages"][0]["content"][1]["text"]
        == "Q: Which country's flag is this? [Japan/Peru/Ghana/India]"
    )
    assert prompt_hash(row(), cfg) != prompt_hash(row(), SuiteConfig())
    assert prompt_hash(row(), cfg) == prompt_hash(row(), cfg)


def test_acc_and_acc_norm_follow_lm_eval():
    # "Japan" (5 chars) -6.0 -> -1.2/char; "India" -5.5 -> -1.1/char; "Peru" -5.0 -> -1.25/char
    r = row(options=["Japan", "Peru", "Ghana", "India"], answer=3)
    res = score(r, SuiteConfig(), [scored([-6.0, -5.0, -9.0, -5.5], r.options)])
    assert res["pred_index"] == 1 and res["correct"] is False
    assert res["pred_index_norm"] == 3 and res["correct_norm"] is True
    assert res["prediction"] == "B" and res["choice_scores"][0] == [-6.0, 1]


def test_circular_counts_only_if_every_rotation_right():
    r = row()
    cfg = SuiteConfig("mcq", "loglik", circular=True)
    # each rotation r lists options rotated; make the model always pick "Japan"
    right = [scored([0.0 if o == "Japan" else -1.0 for o in rotate(OPTS, k)], rotate(OPTS, k)) for k in range(4)]
    assert score(r, cfg, right)["correct"] is True
    wrong = list(right)
    wrong[2] = scored([-1.0, 0.0, -1.0, -1.0], rotate(OPTS, 2))
    res = score(r, cfg, wrong)
    assert res["correct"] is False and res["correct_vanilla"] is True


def test_generate_scoring_and_unlabeled():
    cfg = SuiteConfig("mcq", "generate", circular=True)
    outs = [gen("A"), gen("D"), gen("C"), gen("B")]  # Japan sits at A, D, C, B in rotations 0..3
    assert score(row(), cfg, outs)["correct"] is True
    res = score(row(answer=None), SuiteConfig("mcq", "generate"), [gen("zzz")])
    assert res["correct"] is None and res["prediction"] == ""


def test_vqa_exact_and_contains():
    cfg = SuiteConfig("vqa")
    r = row(options=[], answer=["Tokyo", "東京"])
    assert score(r, cfg, [gen(" tokyo. ")]) == {
        "prediction": "tokyo.",
        "correct": True,
        "normalized": True,
        "contains": True,
    }
    res = score(r, cfg, [gen("It is 東京です")])
    assert res["correct"] is False and res["contains"] is True


def test_engine_error_is_recorded():
    res = score(row(), SuiteConfig(), [ScoreOutput(0, [], error="image unreadable")])
    assert res == {"error": "image unreadable", "correct": None}
