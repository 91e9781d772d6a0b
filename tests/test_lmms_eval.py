"""The lmms-eval backend: the real lmms-eval package runs two tiny local tasks (images built here) through
`python -m cultengine.lmms_eval`, and answers as `cultengine bench` does on the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cultengine
from cultengine.cli import main as cultengine_main

# scripts/test installs lmms-eval (with --no-deps; its light dependencies are in the test extra).
datasets = pytest.importorskip("datasets")
pytest.importorskip("lmms_eval", reason="pip install --no-deps lmms-eval==0.7.3")

QUESTIONS = [
    ("Which country's flag is this?", ["Japan", "Peru", "Ghana", "India"], "B"),
    ("Where is this dish from?", ["Mexico", "Italy", "Thailand"], "A"),
    ("Which festival is shown?", ["Diwali", "Holi", "Carnival", "Hanami"], "D"),
    ("What is the capital of this country?", ["Lima", "Accra"], "B"),
    ("Which currency is used here?", ["Yen", "Sol", "Cedi", "Rupee"], "C"),
]
LETTERS = "ABCDEFGHIJ"

# The task's prompts are written out as a user would, and equal the bench suites' (bench/suites.py).
TASK_UTILS = """
LETTERS = "ABCDEFGHIJ"


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def _listing(doc):
    return doc["question"] + "\\n" + "".join(f"{LETTERS[i]}. {o}\\n" for i, o in enumerate(doc["options"]))


def doc_to_text_loglik(doc):
    return _listing(doc) + "Answer with the text of the correct option."


def doc_to_text_letter(doc):
    return _listing(doc) + "Answer with the option's letter from the given choices directly."


def doc_to_choice(doc):
    return list(doc["options"])


def doc_to_target_index(doc):
    return LETTERS.index(doc["answer"])


def doc_to_target_letter(doc):
    return doc["answer"]
"""

TASKS = {
    "ce_mc.yaml": """
        task: ce_mc
        dataset_path: {data}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: multiple_choice
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text_loglik
        doc_to_choice: !function utils.doc_to_choice
        doc_to_target: !function utils.doc_to_target_index
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
    """,
    "ce_gen.yaml": """
        task: ce_gen
        dataset_path: {data}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text_letter
        doc_to_target: !function utils.doc_to_target_letter
        generation_kwargs:
          max_new_tokens: 16
          until: ["\\n"]
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """,
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The same rows as a canonical benchmark file (for `cultengine bench`) and a datasets dataset on disk."""
    from PIL import Image

    root = tmp_path_factory.mktemp("lmms")
    images, bench_rows = [], []
    for i, (question, options, answer) in enumerate(QUESTIONS):
        img = Image.new("RGB", (40 + 8 * i, 32), (40 * i, 200 - 30 * i, 90))
        img.save(root / f"img{i}.png")
        images.append(img)
        bench_rows.append(
            {
                "id": f"q{i}",
                "images": [f"img{i}.png"],
                "question": question,
                "options": options,
                "answer": answer,
                "country": "Peru",
            }
        )
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_rows))
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "id": [r["id"] for r in bench_rows],
            "image": images,
            "question": [q for q, _, _ in QUESTIONS],
            "options": [o for _, o, _ in QUESTIONS],
            "answer": [a for _, _, a in QUESTIONS],
        },
        features=features,
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root / "ds"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    for name, text in TASKS.items():
        (tasks / name).write_text(textwrap.dedent(text).format(data=root / "ds"))
    return root


def _bench(checkpoint: Path, rows: Path, scoring: str) -> dict[str, dict]:
    out = rows / f"bench-{scoring}"
    code = cultengine_main(
        [
            "bench",
            "--model",
            str(checkpoint),
            "--data",
            str(rows / "rows.jsonl"),
            "--device",
            "cpu",
            "--scoring",
            scoring,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in results}


def _samples(out: Path, task: str, log: str) -> list[dict]:
    paths = list(out.rglob(f"*samples_{task}*.jsonl"))
    assert len(paths) == 1, log  # lmms-eval reports a failed task in its log, with exit status 0
    (path,) = paths
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lmms_eval_runs_local_tasks_with_bench_answers(tiny_llama, rows):
    out = rows / "lmms-out"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(cultengine.__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(rows / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "cultengine.lmms_eval",
        "--model",
        "cultengine",
        "--model_args",
        f"pretrained={tiny_llama},device=cpu",
        "--tasks",
        "ce_mc,ce_gen",
        "--include_path",
        str(rows / "tasks"),
        "--output_path",
        str(out),
        "--log_samples",
        "--verbosity",
        "WARNING",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout[-5000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, log

    loglik = _bench(tiny_llama, rows, "loglik")
    mc = _samples(out, "ce_mc", log)
    assert len(mc) == len(QUESTIONS)
    for sample in mc:
        ref = loglik[f"q{sample['doc_id']}"]
        # negative log-likelihoods (lmms-eval picks the lowest), logged as strings
        lls = [-float(nll) for nll, _ in sample["filtered_resps"]]
        assert lls == pytest.approx([s[0] for s in ref["choice_scores"]], abs=1e-4)
        assert max(range(len(lls)), key=lls.__getitem__) == ref["pred_index"]
        assert sample["acc"] == float(ref["correct"])

    generated = _bench(tiny_llama, rows, "generate")
    gen = _samples(out, "ce_gen", log)
    assert len(gen) == len(QUESTIONS)
    for sample in gen:
        ref = generated[f"q{sample['doc_id']}"]
        assert sample["filtered_resps"] == ref["response"]
        assert sample["exact_match"] == float(ref["correct"])


def test_adapter_groups_options_per_context_and_maps_generation_kwargs(tiny_llama):
    """In process, on lmms-eval's own Instance objects: one score request per (context, images), the
    unconditional (mutual-information) pairs, raw-prompt mode, generation kwargs."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model
    from PIL import Image

    from cultengine import Engine, SamplingParams
    from cultengine.lmms_eval import CultEngineLMM, register

    register()
    assert get_model("cultengine") is CultEngineLMM
    lm = CultEngineLMM.create_from_arg_string(f"pretrained={tiny_llama},device=cpu", {"batch_size": 1})
    image = Image.new("RGB", (30, 30), (10, 120, 240))
    docs = [{"q": "Which country?", "img": image}, {"q": "Which country?", "img": Image.new("RGB", (30, 30))}]
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        return [doc["img"]]

    def inst(kind, args, doc_id):
        return Instance(
            request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1}
        )

    options = [" Peru", " Japan", " Ghana"]
    reqs = [inst("loglikelihood", ("Which country?", o, visual, d, "t", "test"), d) for d in (0, 1) for o in options]
    reqs.append(inst("loglikelihood", ("", "Peru"), 0))
    got = [r.text for r in lm.loglikelihood(reqs)]

    ref = Engine(tiny_llama)
    content = [{"type": "text", "text": "Which country?"}]
    scores = ref.score(
        [
            {
                "messages": [{"role": "user", "content": [{"type": "image", "image": d["img"]}, *content]}],
                "choices": [o.strip() for o in options],
            }
            for d in docs
        ]
        + [{"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}], "choices": ["Peru"]}],
        use_tqdm=False,
    )
    want = [(-c.logprob, c.is_greedy) for s in scores for c in s.choices]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], abs=1e-5)
    assert [g for _, g in got] == [g for _, g in want]
    assert got[0][0] != got[3][0]  # the same text with another image is another context

    raw = CultEngineLMM(pretrained=str(tiny_llama), device="cpu", chat="false", nll="false")
    raw.task_dict = lm.task_dict
    ((value, _),) = [
        r.text for r in raw.loglikelihood([inst("loglikelihood", ("Q:", " Peru", visual, 0, "t", "test"), 0)])
    ]
    (expected,) = ref.score([{"prompt": "<image>\nQ:", "images": [image], "choices": [" Peru"]}], use_tqdm=False)
    assert value == pytest.approx(expected.choices[0].logprob, abs=1e-5)

    gen = {"until": "\n", "max_new_tokens": 7, "temperature": 0.9, "do_sample": True}
    texts = lm.generate_until(
        [
            inst("generate_until", ("Describe.", dict(gen), visual, 0, "t", "test"), 0),
            inst("generate_until", ("Describe.", {**gen, "do_sample": False}, visual, 0, "t", "test"), 0),
        ]
    )
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    sampled, greedy = ref.generate(
        [{"messages": msgs}] * 2,
        [SamplingParams(max_tokens=7, temperature=0.9, seed=0, stop=["\n"]), SamplingParams(max_tokens=7, stop=["\n"])],
        use_tqdm=False,
    )
    assert texts == [sampled.text, greedy.text]
    with pytest.raises(ValueError, match="beam search"):
        lm.generate_until([inst("generate_until", ("x", {"num_beams": 4}, visual, 0, "t", "test"), 0)])
    with pytest.raises(TypeError, match="unknown model_args"):
        CultEngineLMM(pretrained=str(tiny_llama), device="cpu", temprature=1)
