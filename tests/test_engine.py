"""End-to-end engine tests against transformers on tiny random LLaVA checkpoints (fp32, CPU).

Greedy tokens identical to `generate`, per-token and choice log-probabilities within 1e-4 of a
transformers forward, and outputs unchanged by prefix caching, preemption and batch composition.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from cultengine import Engine, SamplingParams
from tiny_checkpoints import IMAGE_TOKEN, reference_model

ATOL = 1e-4


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# Zero, one and two images of different sizes; non-ASCII text.
REQUESTS = [
    {"prompt": "Tell me about the festival of lights, señor."},
    {"prompt": f"{IMAGE_TOKEN}\nWhich country is this dish from? 日本", "images": [_image(40, 30, 1)]},
    {
        "prompt": f"{IMAGE_TOKEN} and {IMAGE_TOKEN}: compare the two flags.",
        "images": [_image(33, 50, 2), _image(64, 64, 3)],
    },
    {"prompt": "Short one."},
]


class Reference:
    """transformers' model, tokenizer and image processor on the same checkpoint files."""

    def __init__(self, path):
        self.model = reference_model(path)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.processor = transformers.AutoImageProcessor.from_pretrained(path)  # the path the engine defaults to
        self.image_token_id = self.model.config.image_token_id

    def tokens_per_image(self) -> int:
        cfg = self.model.config
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        return n + (cfg.vision_feature_select_strategy == "full")

    def encode(self, request) -> tuple[list[int], torch.Tensor | None]:
        """LlavaProcessor's expansion: each <image> becomes tokens_per_image copies."""
        ids = self.tokenizer(request["prompt"])["input_ids"]
        expanded = []
        for t in ids:
            expanded += [t] * (self.tokens_per_image() if t == self.image_token_id else 1)
        images = request.get("images") or []
        pixels = self.processor(images, return_tensors="pt")["pixel_values"] if images else None
        return expanded, pixels

    @staticmethod
    def _images(pixels) -> dict:
        # transformers' generate breaks on an explicit pixel_values=None: pass it only with images.
        return {} if pixels is None else {"pixel_values": pixels}

    @torch.no_grad()
    def logprobs(self, ids: list[int], pixels) -> torch.Tensor:
        logits = self.model(input_ids=torch.tensor([ids]), **self._images(pixels)).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def greedy(self, ids: list[int], pixels, max_new_tokens: int) -> list[int]:
        input_ids = torch.tensor([ids])
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **self._images(pixels),
        )
        return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param)
    return Engine(path, dtype="float32"), Reference(path)


def test_tokenization_matches_transformers(pair):
    engine, ref = pair
    texts = ["Hello world", " ¿Qué tal? 日本の料理 🍣", f"{IMAGE_TOKEN} x<|im_end|>y", ""]
    for special in (True, False):
        expected = [ref.tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
        assert engine.tokenizer.encode_batch(texts, add_special_tokens=special) == expected


def test_greedy_generation_is_token_identical_to_transformers(pair):
    engine, ref = pair
    outs = engine.generate(REQUESTS, SamplingParams(max_tokens=10), use_tqdm=False)
    for req, out in zip(REQUESTS, outs, strict=True):
        ids, pixels = ref.encode(req)
        assert out.error is None
        assert out.prompt_token_ids == ids
        expected = ref.greedy(ids, pixels, 10)
        assert out.token_ids == expected
        assert out.text == ref.tokenizer.decode(expected, skip_special_tokens=True)
        # Per-token logprobs against a forward over prompt + output.
        lp = ref.logprobs(ids + expected, pixels)
        want = lp[len(ids) - 1 : -1].gather(1, torch.tensor(expected)[:, None]).squeeze(1)
        np.testing.assert_allclose(out.logprobs, want.numpy(), atol=ATOL)


def test_chat_messages_match_apply_chat_template(pair):
    engine, ref = pair
    img = _image(50, 41, 9)
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Where?"}]}]
    out = engine.generate([{"messages": messages}], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    # As transformers' processors do: render, then tokenize without adding special tokens again.
    text = ref.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = []
    for t in ref.tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids += [t] * (ref.tokens_per_image() if t == ref.image_token_id else 1)
    assert out.error is None
    assert out.prompt_token_ids == ids


def test_choice_loglikelihoods_match_transformers(pair):
    engine, ref = pair
    choices = ["Japan", " Peru", "Ghana and more", "インド"]
    reqs = [
        {**REQUESTS[1], "choices": choices},
        {**REQUESTS[0], "choices": choices[:2]},
        {**REQUESTS[2], "choices": choices[2:]},
    ]
    scores = engine.score(reqs, use_tqdm=False)
    for req, out in zip(reqs, scores, strict=True):
        assert out.error is None
        ctx, pixels = ref.encode(req)
        for choice, got in zip(req["choices"], out.choices, strict=True):
            cont = ref.tokenizer(choice, add_special_tokens=False)["input_ids"]
            lp = ref.logprobs(ctx + cont, pixels)
            per_token = lp[len(ctx) - 1 : -1].gather(1, torch.tensor(cont)[:, None]).squeeze(1)
            assert got.num_tokens == len(cont)
            assert got.logprob == pytest.approx(float(per_token.sum()), abs=ATOL)
            greedy = bool((lp[len(ctx) - 1 : -1].argmax(-1) == torch.tensor(cont)).all())
            assert got.is_greedy == greedy


def test_score_shares_the_context_through_the_prefix_cache(tiny_llama):
    engine = Engine(tiny_llama, dtype="float32", block_size=4)
    req = {**REQUESTS[2], "choices": ["a", "b", "c", "d"]}
    before = engine.stats()["prefix_cache_hit_tokens"]
    out = engine.score([req], use_tqdm=False)[0]
    assert out.error is None
    # Three of four choices reuse the context's full blocks.
    assert engine.stats()["prefix_cache_hit_tokens"] - before >= 3 * 4


def test_greedy_choice_is_flagged(tiny_llama):
    engine = Engine(tiny_llama, dtype="float32")
    gen = engine.generate([REQUESTS[0]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    text = engine.tokenizer.decode(gen.token_ids, skip_special_tokens=False)
    score = engine.score([{**REQUESTS[0], "choices": [text]}], use_tqdm=False)[0]
    if engine.tokenizer.encode(text) == gen.token_ids:  # the text re-tokenizes to the same ids
        assert score.choices[0].is_greedy


def test_prefix_caching_and_preemption_change_nothing(tiny_llama):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    reqs = REQUESTS * 3
    base = Engine(tiny_llama, dtype="float32", enable_prefix_caching=False)
    expected = [o.token_ids for o in base.generate(reqs, params, use_tqdm=False)]
    cached = Engine(tiny_llama, dtype="float32")
    assert [o.token_ids for o in cached.generate(reqs, params, use_tqdm=False)] == expected
    assert cached.stats()["prefix_cache_hit_tokens"] > 0
    # A KV budget of a few sequences forces preemption by recompute.
    tight = Engine(tiny_llama, dtype="float32", block_size=4, num_blocks=24, max_model_len=96)
    assert [o.token_ids for o in tight.generate(reqs, params, use_tqdm=False)] == expected
    assert tight.stats()["num_preemptions"] > 0


def test_seeded_sampling_is_batch_invariant_and_n_samples(tiny_llama):
    engine = Engine(tiny_llama, dtype="float32")
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3, ignore_eos=True)
    alone = engine.generate([REQUESTS[1]], params, use_tqdm=False)[0]
    mixed = engine.generate(
        REQUESTS,
        [SamplingParams(max_tokens=5), params, SamplingParams(max_tokens=9, temperature=0.7, seed=1), SamplingParams()],
        use_tqdm=False,
    )[1]
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in mixed.samples]
    assert len({tuple(s.token_ids) for s in alone.samples}) > 1  # n samples differ


def test_stop_strings_cut_the_text(tiny_llama):
    engine = Engine(tiny_llama, dtype="float32")
    full = engine.generate([REQUESTS[0]], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate([REQUESTS[0]], SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert full.finish_reason == "length" and len(full.token_ids) == 16


def test_bad_requests_fail_alone_and_the_engine_stays_usable(tiny_llama, tmp_path):
    engine = Engine(tiny_llama, dtype="float32", max_model_len=64)
    truncated = io.BytesIO()
    _image(30, 30, 4).save(truncated, format="PNG")
    good = REQUESTS[1]
    bad = [
        ({"prompt": f"{IMAGE_TOKEN} hi", "images": [_image(9, 9, 0), _image(9, 9, 1)]}, "placeholder"),
        ({"prompt": f"{IMAGE_TOKEN} {IMAGE_TOKEN}", "images": [_image(9, 9, 0)]}, "placeholder"),
        ({"prompt": f"{IMAGE_TOKEN} hi", "images": [str(tmp_path / "missing.jpg")]}, "missing.jpg"),
        ({"prompt": f"{IMAGE_TOKEN} hi", "images": [truncated.getvalue()[:60]]}, "image"),
        ({"prompt": "word " * 200}, "max_model_len"),
        (123, "dict"),  # a string is a prompt (vLLM's simplest form); other non-dicts are refused
    ]
    outs = engine.generate([good] + [b for b, _ in bad] + [good], SamplingParams(max_tokens=4), use_tqdm=False)
    assert outs[0].error is None and outs[-1].error is None
    assert outs[0].token_ids == outs[-1].token_ids
    for out, (_, needle) in zip(outs[1:-1], bad, strict=True):
        assert out.error and needle in out.error, out.error
        assert out.samples == []
    scores = engine.score(
        [{**good, "choices": []}, {**good, "choices": ["x"]}, 123, {**good, "choices": "x"}], use_tqdm=False
    )
    assert "choices" in scores[0].error and scores[1].error is None
    assert "dict" in scores[2].error and "choices" in scores[3].error
    assert engine.generate([good], SamplingParams(max_tokens=4), use_tqdm=False)[0].token_ids == outs[0].token_ids


def test_an_image_file_named_by_many_requests_is_preprocessed_once(tiny_llama, tmp_path):
    engine = Engine(tiny_llama, dtype="float32")
    path = tmp_path / "flag.png"
    _image(30, 20, 5).save(path)
    calls = []
    processor = engine.preparer.image_processor
    engine.preparer.image_processor = lambda src, options=None: calls.append(src) or processor(src, options)
    reqs = [{"prompt": f"{IMAGE_TOKEN} question {i}", "images": [str(path)]} for i in range(5)]
    reqs.append({"prompt": f"{IMAGE_TOKEN} broken", "images": [str(tmp_path / "missing.png")]})
    outs = engine.generate(reqs, SamplingParams(max_tokens=2), use_tqdm=False)
    assert [o.error is None for o in outs] == [True] * 5 + [False]
    assert "missing.png" in outs[-1].error
    assert len(calls) == 2  # the shared file once, the missing one once


def test_sliding_window_attention_is_exact_beyond_the_window(tiny_mistral, tmp_path):
    """Mistral with a 24-token window and prompts 2-4x as long: greedy tokens and log-probabilities are
    transformers' (whose eager mask is the window), in one pass, in chunks that cross the window's edge,
    and from a prefix cache whose blocks lie outside the window."""
    import json
    import shutil

    path = Path(shutil.copytree(tiny_mistral, tmp_path / "windowed"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["sliding_window"] = 24
    (path / "config.json").write_text(json.dumps(config))
    ref = Reference(path)
    assert ref.model.config.text_config.sliding_window == 24
    reqs = [
        {"prompt": "The festival of lights and the food " * 6},
        {"prompt": f"{IMAGE_TOKEN}\nWhich country is this dish from? " * 3, "images": [_image(40, 30, 1)] * 3},
    ]
    engine = Engine(path, dtype="float32")
    assert engine.max_model_len == config["text_config"]["max_position_embeddings"]  # no cap at the window
    outs = engine.generate(reqs, SamplingParams(max_tokens=6), use_tqdm=False)
    for req, out in zip(reqs, outs, strict=True):
        ids, pixels = ref.encode(req)
        assert out.error is None and out.prompt_token_ids == ids and len(ids) > 2 * 24
        expected = ref.greedy(ids, pixels, 6)
        assert out.token_ids == expected
        lp = ref.logprobs(ids + expected, pixels)
        want = lp[len(ids) - 1 : -1].gather(1, torch.tensor(expected)[:, None]).squeeze(1)
        np.testing.assert_allclose(out.logprobs, want.numpy(), atol=ATOL)
    chunked = Engine(path, dtype="float32", max_num_batched_tokens=20, block_size=4)
    assert [o.token_ids for o in chunked.generate(reqs * 2, SamplingParams(max_tokens=6), use_tqdm=False)] == [
        o.token_ids for o in outs
    ] * 2
    assert chunked.stats()["prefix_cache_hit_tokens"] > 24  # the repeats reuse blocks beyond the window


def test_request_forms_match_the_list_of_dicts_form(tiny_llama):
    engine = Engine(tiny_llama, dtype="float32")
    params = SamplingParams(max_tokens=5)
    canonical = engine.generate(REQUESTS[:2], params, use_tqdm=False)
    assert engine.generate(REQUESTS[0]["prompt"], params, use_tqdm=False)[0].token_ids == canonical[0].token_ids
    one = engine.generate(REQUESTS[1], params, use_tqdm=False)  # a dict alone is one request, not its keys
    assert len(one) == 1 and one[0].token_ids == canonical[1].token_ids
    vllm = {"prompt": REQUESTS[1]["prompt"], "multi_modal_data": {"image": REQUESTS[1]["images"][0]}}
    assert engine.generate([vllm], params, use_tqdm=False)[0].token_ids == canonical[1].token_ids
    bad = engine.generate([{"prompt": "x", "multi_modal_data": {"video": b"..."}}], params, use_tqdm=False)[0]
    assert "multi_modal_data" in bad.error and "video" in bad.error
    score = engine.score({**REQUESTS[0], "choices": ["a", "b"]}, use_tqdm=False)
    assert len(score) == 1 and len(score[0].choices) == 2


def test_engine_demo_and_threads(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    engine = Engine("demo", threads=1)
    assert torch.get_num_threads() == 1 and engine.checkpoint.config.get("cultengine_demo")
    with pytest.raises(ValueError, match="threads"):
        Engine("demo", threads=0)
    torch.set_num_threads(1)


def test_choices_compute_only_their_own_tokens_and_score_alike_under_pressure(tiny_llama):
    """Each choice forks from its context (computed once, its last row scoring every first choice token);
    a choice computes only its tokens but the last. Tight memory (forked choices release their shared
    blocks, preemption) and no prefix caching change no score."""
    choices = ["Japan", " Peru and Chile", "Ghana", "a much longer answer about India"]
    reqs = [{**r, "choices": choices} for r in REQUESTS[:3]]
    engine = Engine(tiny_llama, dtype="float32", enable_prefix_caching=False)
    want = engine.score(reqs, use_tqdm=False)
    contexts = [len(engine.prepare([r])[0].prompt_ids) for r in reqs]
    own = sum(len(engine.tokenizer.encode(c)) - 1 for c in choices) * len(reqs)
    assert engine.stats()["prefill_tokens_computed"] == sum(contexts) + own
    longest = max(contexts) + max(len(engine.tokenizer.encode(c)) for c in choices)
    for kw in (
        {"block_size": 4, "num_blocks": -(-longest // 4) + 2, "max_model_len": longest},
        {"block_size": 4, "max_num_batched_tokens": 8},
    ):
        got = Engine(tiny_llama, dtype="float32", **kw).score(reqs, use_tqdm=False)
        for a, b in zip(got, want, strict=True):
            assert a.error is None
            np.testing.assert_allclose([c.logprob for c in a.choices], [c.logprob for c in b.choices], atol=1e-5)
            assert [c.is_greedy for c in a.choices] == [c.is_greedy for c in b.choices]


def test_top_logprobs_of_generated_and_prompt_tokens_match_a_transformers_forward(tiny_llama):
    engine, ref = Engine(tiny_llama, dtype="float32"), Reference(tiny_llama)
    req = REQUESTS[1]
    out = engine.generate(
        [req], SamplingParams(max_tokens=5, logprobs=3, prompt_logprobs=2, n=2, seed=0, temperature=1.0), use_tqdm=False
    )[0]
    ids, pixels = ref.encode(req)
    for sample in out.samples:
        lp = ref.logprobs(ids + sample.token_ids, pixels)
        assert len(sample.top_logprobs) == len(sample.token_ids)
        for step, (top, tok) in enumerate(zip(sample.top_logprobs, sample.token_ids, strict=True)):
            row = lp[len(ids) - 1 + step]
            want = dict(zip(*[x.tolist() for x in row.topk(3)][::-1], strict=True))
            assert tok in top and top[tok] == pytest.approx(float(row[tok]), abs=ATOL)
            for t, v in want.items():
                assert top[t] == pytest.approx(v, abs=ATOL)
    lp = ref.logprobs(ids, pixels)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        assert out.prompt_logprobs[p] == pytest.approx(float(lp[p - 1, ids[p]]), abs=ATOL)
        top = out.prompt_top_logprobs[p]
        assert ids[p] in top and set(lp[p - 1].topk(2).indices.tolist()) <= set(top)
    plain = engine.generate([req], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    assert plain.samples[0].top_logprobs is None and plain.prompt_logprobs is None
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=50)
