"""Text-only families (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`)
against transformers.

Mistral attends over a 12-token window on every layer, Qwen2 and Qwen3 on their second layer only
(`max_window_layers`); the prompts are 3-5x the window. Greedy tokens identical, per-token and choice
log-likelihoods within 1e-4 (fp32), token ids equal to the tokenizer's chat template.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from cultengine import Engine, SamplingParams
from tiny_gemma import TEXT_ARCHS, TEXT_WINDOW, build_tiny_text

ATOL = 1e-4
WINDOWED_LAYERS = {
    "LlamaForCausalLM": (),
    "MistralForCausalLM": (0, 1),
    "Qwen2ForCausalLM": (1,),
    "Qwen3ForCausalLM": (1,),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Tell me about the festival of lights and the food, señor. 日本の料理"}],
    [
        {"role": "system", "content": "Answer with a single letter."},
        {"role": "user", "content": [{"type": "text", "text": "Which country is this dish from? A, B, C or D."}]},
    ],
]


@pytest.fixture(scope="module", params=TEXT_ARCHS)
def family(request, tmp_path_factory):
    path = build_tiny_text(tmp_path_factory.mktemp(request.param), request.param)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return path, Engine(path, dtype="float32"), model, transformers.AutoTokenizer.from_pretrained(path)


def _ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_greedy_tokens_and_logprobs_match_transformers(family):
    path, engine, model, tokenizer = family
    assert engine.family.placeholder_id is None and engine.provenance()["image_processor"] is None
    assert engine.family.text.windowed_layers == WINDOWED_LAYERS[engine.checkpoint.architecture]
    outs = engine.generate([{"messages": m} for m in CONVERSATIONS], SamplingParams(max_tokens=8), use_tqdm=False)
    for messages, out in zip(CONVERSATIONS, outs, strict=True):
        ids = _ids(tokenizer, messages)
        assert out.error is None, out.error
        assert out.prompt_token_ids == ids and len(ids) > 2 * TEXT_WINDOW
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
        assert out.token_ids == want
        lp = _logprobs(model, ids + want)
        np.testing.assert_allclose(
            out.logprobs, lp[len(ids) - 1 : -1].gather(1, torch.tensor(want)[:, None])[:, 0], atol=ATOL
        )


def test_choice_loglikelihoods_match_transformers(family):
    _, engine, model, tokenizer = family
    choices = ["Japan", " Peru", "Ghana and more"]
    score = engine.score([{"messages": CONVERSATIONS[1], "choices": choices}], use_tqdm=False)[0]
    assert score.error is None, score.error
    ctx = _ids(tokenizer, CONVERSATIONS[1])
    for choice, got in zip(choices, score.choices, strict=True):
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        lp = _logprobs(model, ctx + cont)[len(ctx) - 1 : -1]
        assert got.logprob == pytest.approx(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=ATOL)


def test_chunked_prefill_beyond_the_window_and_images_refused(family):
    path, engine, _, _ = family
    reqs = [{"messages": m} for m in CONVERSATIONS] * 2
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=2, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(reqs, params, use_tqdm=False)]
    chunked = Engine(path, dtype="float32", max_num_batched_tokens=7, block_size=4)
    assert [o.token_ids for o in chunked.generate(reqs, params, use_tqdm=False)] == expected
    image = engine.generate([{"prompt": "<image> what?", "images": [Image.new("RGB", (4, 4))]}], use_tqdm=False)[0]
    assert image.error and "text-only" in image.error


def test_values_compares_an_llm_with_its_vlm_in_one_report(tiny_llama, tmp_path):
    """`cultengine values --model <llm> --model <vlm>`: the LLM runs the text condition only and says so."""
    import json

    from cultengine.cli import main

    llm = build_tiny_text(tmp_path / "llm", "LlamaForCausalLM")
    item = {"id": "q1", "question": "How important is family?", "options": ["Very", "Rather", "Not"], "topic": "family"}
    (tmp_path / "items.jsonl").write_text(json.dumps(item) + "\n")
    (tmp_path / "human.csv").write_text("item_id,country,distribution\nq1,Japan,5|3|2\nq1,Peru,6|3|1\n")
    Image.new("RGB", (30, 20), (200, 30, 30)).save(tmp_path / "market.png")
    (tmp_path / "imgs.csv").write_text(f"country,category,image\nJapan,food,{tmp_path / 'market.png'}\n")
    out = tmp_path / "run"
    args = [
        "values",
        "--model",
        str(llm),
        "--model",
        str(tiny_llama),
        "--out",
        str(out),
        "--items",
        str(tmp_path / "items.jsonl"),
        "--human",
        str(tmp_path / "human.csv"),
        "--images",
        str(tmp_path / "imgs.csv"),
        "--dtype",
        "float32",
    ]
    assert main(args) == 0
    llm_run, vlm_run = sorted(p for p in out.iterdir() if p.is_dir())
    text_only = json.loads((llm_run / "summary.json").read_text())
    assert text_only["num_records"] == 2 and text_only["images_skipped"] == "text-only model: image conditions skipped"
    assert json.loads((vlm_run / "summary.json").read_text())["num_records"] == 3  # text + the Japan image
    result = json.loads((out / "compare.json").read_text())
    assert result["kind"] == "values" and result["text_only"] == [str(llm)] and result["prompts"] == 2
    assert {p["a"] for p in result["paired"]} | {p["b"] for p in result["paired"]} == {str(llm), str(tiny_llama)}
    report = (out / "compare.md").read_text()
    assert "text-only model: image conditions skipped" in report and (out / "compare.html").is_file()
