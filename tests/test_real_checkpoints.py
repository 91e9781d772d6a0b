"""The published files of real models (tests/fixtures/real/, sources in each SOURCES.md) against transformers:
config.json as published but for tiny layer sizes, the tokenizer, chat template, processor and generation
files byte for byte, random weights (`real_checkpoints.build_from_published`).

For each: token ids equal `processor.apply_chat_template(tokenize=True)`'s, greedy tokens equal transformers'
`generate` (the checkpoint's own generation_config.json applies on both sides: Qwen2.5-VL's repetition
penalty 1.05), log-probabilities within 1e-4 in fp32, choice log-likelihoods too, on images of several sizes
and aspect ratios, on both image paths (PIL and torchvision). And the two failures these files showed:
Qwen2.5-VL's tokenizer_config.json carries a text-only (tool-calling) template that fails on typed content
(the processor's chat_template.json is the one transformers renders with), and LLaVA-1.5's template writes no
BOS while its tokenizer adds one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cultengine import Engine, SamplingParams
from family_parity import assert_choice_scores_match, assert_generations_match, image, reference, user
from real_checkpoints import TEXT as TEXT_SIZES
from real_checkpoints import build_from_published, published_files
from tiny_checkpoints import perturb

WIDE, TALL, LARGE, SMALL = image(90, 24, 1), image(22, 70, 2), image(200, 160, 3), image(20, 15, 4)
CONVERSATIONS = [
    user("Tell me about the festival of lights, señor."),
    user(WIDE, "Which country is this dish from? 日本"),
    user(TALL, "and", LARGE, ": compare the two flags."),
    user(SMALL, "Where?"),
]
VLMS = [
    "Qwen2.5-VL-7B-Instruct",
    "Qwen2.5-VL-7B-Instruct-a22b9b2",
    "Qwen3-VL-4B-Instruct",
    "Qwen2-VL-2B-Instruct",
    "llava-1.5-7b-hf",
    "SmolVLM-256M-Instruct",
]
BACKENDS = ["pil", "torchvision"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> its tiny checkpoint, each built once for the module."""
    paths = {}

    def get(name):
        if name not in paths:
            paths[name] = build_from_published(name, tmp_path_factory.mktemp(name))
        return paths[name]

    return get


@pytest.fixture(scope="module", params=VLMS)
def vlm(request, built):
    return request.param, built(request.param)


def _oracle_files(name, path, tmp_path):
    """The files transformers is run on: the published ones, but for the first Qwen2.5-VL revision's
    preprocessor_config.json, whose `image_processor_type` "Qwen2_5_VLImageProcessor" transformers 5 no longer
    recognises (it refuses the folder); the engine reads it as the Qwen image processor, and the oracle gets the
    name the next revision (cc59489) gave it, with every value unchanged."""
    if not name.endswith("-a22b9b2"):
        return path
    oracle = tmp_path / "oracle"
    shutil.copytree(path, oracle)
    cfg = json.loads((oracle / "preprocessor_config.json").read_text())
    (oracle / "preprocessor_config.json").write_text(
        json.dumps({**cfg, "image_processor_type": "Qwen2VLImageProcessor"})
    )
    return oracle


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_files_generate_and_score_as_transformers(vlm, backend, tmp_path):
    name, path = vlm
    engine = Engine(path, dtype="float32", image_backend=backend)
    model, processor = reference(_oracle_files(name, path, tmp_path), backend=backend)
    assert engine.provenance()["image_backend"] == backend
    lengths = assert_generations_match(engine, model, processor, CONVERSATIONS, max_tokens=6)
    assert len(set(lengths[1:])) == 3  # the images gave different token counts
    if backend == "pil":
        assert_choice_scores_match(engine, model, processor, CONVERSATIONS[:2])


def test_qwen2_5_vl_renders_with_the_processors_template_not_the_tokenizers(built):
    """As first published, its tokenizer_config.json's template (tools, plain-string content) fails on typed
    content parts; transformers' processor renders with chat_template.json, and so does the engine."""
    path = built("Qwen2.5-VL-7B-Instruct-a22b9b2")
    tokenizer_template = json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    processor_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    assert tokenizer_template != processor_template and "tools" in tokenizer_template
    engine = Engine(path, dtype="float32")
    out = engine.generate([{"messages": CONVERSATIONS[1]}], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.error is None
    assert engine.provenance()["chat_template"] == "chat_template.json"


def test_llava_1_5_prompts_start_with_bos(built):
    """The llava-hf template writes no `{{ bos_token }}`; the tokenizer adds `<s>` (id 1), as
    `apply_chat_template(tokenize=True)` does."""
    path = built("llava-1.5-7b-hf")
    engine = Engine(path, dtype="float32")
    out = engine.generate([{"messages": CONVERSATIONS[0]}], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_token_ids[0] == 1 and out.prompt_token_ids[1] != 1


def test_qwen2_5_vl_sampling_defaults_come_from_its_generation_config(built):
    """Both revisions' generation_config.json (do_sample with a near-zero temperature, repetition penalty 1.05)."""
    later = Engine(built("Qwen2.5-VL-7B-Instruct"), dtype="float32").provenance()["sampling_defaults"]
    assert later["applied"] == {"temperature": 1e-06, "repetition_penalty": 1.05} and later["not_followed"] == {}
    first = Engine(built("Qwen2.5-VL-7B-Instruct-a22b9b2"), dtype="float32").provenance()["sampling_defaults"]
    assert first["applied"] == {"temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}


def test_text_model_renders_with_its_tokenizers_template(tmp_path):
    """Qwen2.5-7B-Instruct (the LLM beside Qwen2.5-VL): no processor, so tokenizer_config.json's template (the
    tool-calling one) and no special tokens added; greedy with its published repetition penalty."""
    import transformers as t

    path = build_from_published("Qwen2.5-7B-Instruct", tmp_path / "q")
    tok = t.AutoTokenizer.from_pretrained(path)
    model = t.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(path, dtype="float32")
    messages = [
        [{"role": "user", "content": "Tell me about the festival of lights."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which country? 日本"}],
    ]
    outs = engine.generate(
        [{"messages": m} for m in messages], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False
    )
    for m, out in zip(messages, outs, strict=True):
        ids = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
        assert out.token_ids == want


def _tiny_mistral_with_published_tokenizer(out):
    """Mistral-7B-Instruct-v0.2's published tokenizer and template files around a tiny random
    MistralForCausalLM (its config.json was not found unedited: SOURCES.md)."""
    import transformers as t

    path = published_files("Mistral-7B-Instruct-v0.2", out)
    config = t.MistralConfig(vocab_size=32000, bos_token_id=1, eos_token_id=2, sliding_window=None, **TEXT_SIZES)
    torch.manual_seed(0)
    model = t.MistralForCausalLM(config).float().eval()
    perturb(model, 0, scale=0.02)
    model.save_pretrained(path)
    return path, model


def test_mistral_instruct_tokenizer_and_template_as_transformers(tmp_path):
    """The LLM beside LLaVA-NeXT-Mistral: a legacy SentencePiece (Llama) tokenizer whose template writes
    `{{ bos_token }}` itself (so nothing is added again), `[INST]` turns, and a template that raises on a
    system turn: token ids, greedy tokens and log-probs as transformers', the template's own error reported."""
    import transformers as t

    path, model = _tiny_mistral_with_published_tokenizer(tmp_path / "m")
    tok = t.AutoTokenizer.from_pretrained(path)
    engine = Engine(path, dtype="float32")
    conversations = [
        [{"role": "user", "content": "Tell me about the festival of lights, señor."}],
        [
            {"role": "user", "content": "Which country? 日本"},
            {"role": "assistant", "content": "Japan."},
            {"role": "user", "content": "  And its capital?\n"},
        ],
    ]
    outs = engine.generate(
        [{"messages": m} for m in conversations], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False
    )
    for m, out in zip(conversations, outs, strict=True):
        ids = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert out.error is None and out.prompt_token_ids == ids and ids[0] == 1 and ids[1] != 1
        with torch.no_grad():
            got = model.generate(
                torch.tensor([ids]), max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        want = got.sequences[0, len(ids) :].tolist()
        assert out.token_ids == want
        lps = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(got.scores, want, strict=True)]
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(lps), atol=1e-4, rtol=0)
    (bad,) = engine.generate([{"messages": [{"role": "system", "content": "Be brief."}]}], use_tqdm=False)
    assert "Conversation roles must alternate" in bad.error


def test_fixture_files_are_the_published_ones(tmp_path):
    """Each copied file's sha256 is the one SOURCES.md records from its source repository."""
    import hashlib
    import re

    from real_checkpoints import FIXTURES, PUBLISHED

    folders = [d.name for d in FIXTURES.iterdir() if d.is_dir()]
    assert set(PUBLISHED) < set(folders)
    for name in folders:  # the corpus's folders not yet in a test too (Gemma 3, Qwen2-VL-AWQ, early llava-v1.6-mistral)
        recorded = dict(
            re.findall(r"^\| (\S+) \| \d+ \| ([0-9a-f]{64}) \|", (FIXTURES / name / "SOURCES.md").read_text(), re.M)
        )
        out = published_files(name, tmp_path / name)
        for file in out.iterdir():
            assert hashlib.sha256(file.read_bytes()).hexdigest() == recorded[file.name], (name, file.name)
