"""Which chat template, which special tokens and which sampling defaults a checkpoint's files give, as
transformers applies them, on checkpoints laid out as the published ones are (tiny weights, files edited):

- a VLM renders with its processor's template (chat_template.json / .jinja), never the text-only (tool-calling)
  template Qwen2.5-VL's tokenizer_config.json carries, which fails on typed content parts;
- the BOS rule: a rendered prompt is encoded with special tokens unless it already starts with the BOS token
  (LLaVA-1.5's llava-hf template writes no BOS and its tokenizer has add_bos_token); text-only models'
  tokenizer templates never add them;
- named templates (additional_chat_templates/, a named list in tokenizer_config.json), picked by name;
- generation_config.json's sampling values as defaults the request's values override (`generation_config=
  "auto"`), recorded in provenance; "none" ignores them.
Token ids are compared with transformers' `apply_chat_template(tokenize=True)` on the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from cultengine import Engine, SamplingParams
from cultengine.checkpoint import CheckpointError
from family_parity import CONVERSATIONS, chat_inputs
from tiny_checkpoints import build_tiny_anyres

# The template llava-hf/llava-1.5-*-hf publish, as transformers' own tests carry it
# (huggingface/transformers tests/models/llava_next/test_processing_llava_next.py @ 9bf2627d): no bos_token.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A text-only template of the shape of Qwen2.5's tool-calling one: it concatenates message['content'] as a
# string, so typed content parts (a list) raise "can only concatenate str (not "list") to str".
TEXT_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WITH_BOS = "{{ bos_token }}" + LLAVA_HF_TEMPLATE
TOOL_TEMPLATE = "{{ 'TOOLS ' }}" + LLAVA_HF_TEMPLATE


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_anyres(tmp_path_factory.mktemp("llava-next"), "llava_next")


def _variant(base: Path, tmp_path: Path, *, drop=(), write=None, tokenizer_config=None) -> Path:
    """A copy of `base` with files dropped, files written (name -> text or JSON) and tokenizer_config.json
    fields set."""
    out = tmp_path / "ckpt"
    shutil.copytree(base, out)
    for name in drop:
        (out / name).unlink(missing_ok=True)
    for name, value in (write or {}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(value if isinstance(value, str) else json.dumps(value))
    if tokenizer_config:
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg.update(tokenizer_config)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def _prompt_ids(engine: Engine, messages) -> list[int]:
    (out,) = engine.generate([{"messages": messages}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert out.error is None, out.error
    return out.prompt_token_ids


def _assert_ids_match_processor(path: Path, conversations=CONVERSATIONS, **template) -> list[list[int]]:
    engine = Engine(path, dtype="float32", chat_template=template.get("chat_template"))
    processor = transformers.AutoProcessor.from_pretrained(path)
    ids = []
    for messages in conversations:
        want = chat_inputs(processor, messages, **template)["input_ids"][0].tolist()
        assert _prompt_ids(engine, messages) == want
        ids.append(want)
    return ids


def test_a_vlm_renders_with_the_processor_template_not_the_tokenizers(base, tmp_path):
    """Qwen2.5-VL's layout: chat_template.json for the processor, a text-only template in tokenizer_config.json
    (which fails on typed parts, as it does in transformers' tokenizer)."""
    path = _variant(
        base,
        tmp_path,
        drop=["chat_template.jinja"],
        write={"chat_template.json": {"chat_template": LLAVA_HF_TEMPLATE}},
        tokenizer_config={"chat_template": TEXT_ONLY_TEMPLATE},
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with pytest.raises(TypeError, match="concatenate"):
        tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    _assert_ids_match_processor(path)
    assert Engine(path).provenance()["chat_template"].endswith("chat_template.json")


def _post_processor_adds_bos(path: Path) -> None:
    """tokenizer.json's post-processor puts the BOS first, as llava-hf/llava-1.5's (a Llama tokenizer) does."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tok.save(str(path / "tokenizer.json"))


def test_bos_added_when_the_template_writes_none_and_never_twice(base, tmp_path):
    """LLaVA-1.5's layout: the llava-hf template (no BOS), a tokenizer that adds BOS (and add_bos_token): the
    prompt starts with BOS once, as `apply_chat_template(tokenize=True)`'s; a template that writes the BOS
    itself gets no second one."""
    bos = 0  # <s>
    for name, template in (("no-bos", LLAVA_HF_TEMPLATE), ("bos", WITH_BOS)):
        path = _variant(
            base,
            tmp_path / name,
            drop=["chat_template.jinja"],
            write={"chat_template.jinja": template},
            tokenizer_config={"add_bos_token": True},
        )
        _post_processor_adds_bos(path)
        for ids in _assert_ids_match_processor(path):
            assert ids[0] == bos and ids[1] != bos


def test_add_bos_token_beside_a_tokenizer_json_changes_nothing(base, tmp_path):
    """transformers 5 drops add_bos_token / add_eos_token when a tokenizer.json exists: its post-processor
    decides. A tokenizer.json that adds nothing gives prompts without BOS, whatever tokenizer_config.json says."""
    path = _variant(
        base,
        tmp_path,
        drop=["chat_template.jinja"],
        write={"chat_template.jinja": LLAVA_HF_TEMPLATE},
        tokenizer_config={"add_bos_token": True, "add_eos_token": True},
    )
    for ids in _assert_ids_match_processor(path):
        assert 0 not in ids and 1 not in ids  # neither <s> nor </s>


def test_named_templates_picked_by_name(base, tmp_path):
    """additional_chat_templates/<name>.jinja beside chat_template.jinja: the default unless a name is given;
    an unknown name is a CheckpointError listing the names."""
    path = _variant(base, tmp_path, write={"additional_chat_templates/tool_use.jinja": TOOL_TEMPLATE})
    default = _assert_ids_match_processor(path, CONVERSATIONS[:2])
    named = _assert_ids_match_processor(path, CONVERSATIONS[:2], chat_template="tool_use")
    assert all(a != b for a, b in zip(default, named, strict=True))
    with pytest.raises(CheckpointError, match="tool_use"):
        Engine(path, chat_template="nope")


def test_a_legacy_template_file_beside_named_templates_is_refused(base, tmp_path):
    """transformers refuses chat_template.json beside additional_chat_templates/: so does the engine, naming it."""
    path = _variant(
        base,
        tmp_path,
        drop=["chat_template.jinja"],
        write={
            "chat_template.json": {"chat_template": LLAVA_HF_TEMPLATE},
            "additional_chat_templates/tool_use.jinja": TOOL_TEMPLATE,
        },
    )
    with pytest.raises(CheckpointError, match="chat_template.json"):
        Engine(path)


def test_a_text_only_model_never_adds_special_tokens_to_a_chat(tmp_path):
    """transformers' tokenizer template path encodes the rendered chat with add_special_tokens=False, even where
    the tokenizer adds BOS to plain text: a template without BOS gives a prompt without BOS."""
    from tiny_gemma import build_tiny_text

    path = build_tiny_text(tmp_path / "llama", "LlamaForCausalLM")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, chat_template=TEXT_ONLY_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    _post_processor_adds_bos(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "Which festival is this?"}]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    engine = Engine(path, dtype="float32")
    assert _prompt_ids(engine, messages) == want["input_ids"]
    assert want["input_ids"][0] != tokenizer.bos_token_id
    # ... while a plain prompt is encoded with them, as tokenizer(text) does
    (out,) = engine.generate([{"prompt": "Which"}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert out.prompt_token_ids == tokenizer("Which")["input_ids"]
    assert out.prompt_token_ids[0] == tokenizer.bos_token_id


def test_generation_config_sampling_defaults(base, tmp_path):
    """generation_config.json's temperature/top_p/top_k/repetition_penalty are the defaults ("auto"), the
    request's values win, fields the engine cannot follow (min_p) are named, and "none" leaves the engine's own
    defaults."""
    path = _variant(base, tmp_path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, min_p=0.1)
    (path / "generation_config.json").write_text(json.dumps(gen))

    with pytest.warns(UserWarning, match="min_p"):
        engine = Engine(path, dtype="float32")
    d = engine.provenance()["sampling_defaults"]
    assert d["applied"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert d["not_followed"] == {"min_p": 0.1} and d["source"].endswith("generation_config.json")
    resolved = SamplingParams(max_tokens=3, top_p=0.5).with_defaults(engine.sampling_defaults)
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.7, 0.5, 20)
    assert resolved.repetition_penalty == 1.05

    # The defaults are what a request without its own values samples with: same seed, same tokens as explicit.
    req = [{"prompt": "Tell me a story"}]
    implicit = engine.generate(req, SamplingParams(max_tokens=6, seed=5, ignore_eos=True), use_tqdm=False)
    explicit = engine.generate(
        req,
        SamplingParams(
            max_tokens=6, seed=5, ignore_eos=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05
        ),
    )
    greedy = engine.generate(
        req, SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1, ignore_eos=True), use_tqdm=False
    )
    assert implicit[0].token_ids == explicit[0].token_ids

    plain = Engine(path, dtype="float32", generation_config="none")
    assert plain.provenance()["sampling_defaults"]["applied"] == {}
    unset = plain.generate(req, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert unset[0].token_ids == greedy[0].token_ids  # the engine's own default: greedy


@pytest.mark.parametrize("eos", [2.7, -1, "2", [1, 2.5], True])
def test_a_bad_eos_token_id_names_the_file(base, tmp_path, eos):
    path = _variant(base, tmp_path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = eos
    (path / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(CheckpointError, match="generation_config.json"):
        Engine(path)


def _sentencepiece_model(vocab_size: int) -> bytes:
    """A Llama-style SentencePiece BPE model trained here (<unk>=0, <s>=1, </s>=2, ChatML markers)."""
    import io

    import sentencepiece as spm

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "What is shown in this picture? Describe the festival, the food and the clothing.",
        "Un café au lait, s'il vous plaît. Crème brûlée à la française.",
    ] * 40
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def _sentencepiece_checkpoint(tmp_path: Path) -> Path:
    """A tiny Llama whose tokenizer is only a SentencePiece tokenizer.model (LlamaTokenizer, add_bos_token true),
    as Llama-2-era checkpoints ship it."""
    from tiny_gemma import build_tiny_text

    path = build_tiny_text(tmp_path / "llama", "LlamaForCausalLM")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    for name in ("tokenizer.json", "chat_template.jinja", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    (path / "tokenizer.model").write_bytes(_sentencepiece_model(min(vocab, 160)))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "chat_template": TEXT_ONLY_TEMPLATE,
            }
        )
    )
    return path


TEXTS = ("What is shown in this picture?", "Crème brûlée, señor", "<|im_start|>user\nhi there<|im_end|>")


def test_a_sentencepiece_only_checkpoint_is_converted_as_transformers_does(tmp_path, monkeypatch):
    """No tokenizer.json: converted with transformers' converter, cached, and encoding as AutoTokenizer's, BOS
    included."""
    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path / "cache"))
    path = _sentencepiece_checkpoint(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    engine = Engine(path, dtype="float32")
    assert engine.provenance()["tokenizer"] == "converted from tokenizer.model"
    assert list((tmp_path / "cache" / "tokenizers").glob("*.json"))  # the conversion is kept for next time
    for text in TEXTS:
        (out,) = engine.generate([{"prompt": text}], SamplingParams(max_tokens=1), use_tqdm=False)
        assert out.prompt_token_ids == tokenizer(text)["input_ids"]
        assert out.prompt_token_ids[0] == 1  # <s>, from add_bos_token
    messages = [{"role": "user", "content": "Describe the festival."}]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert _prompt_ids(engine, messages) == want["input_ids"]


def test_a_legacy_llama_tokenizer_json_is_encoded_as_transformers_rebuilds_it(tmp_path, monkeypatch):
    """Llama-2's tokenizer.json prepends "▁" in its normalizer (every text piece between special tokens gets
    one); transformers 5's LlamaTokenizer keeps the vocabulary but pre-tokenizes with Metaspace (only the first
    piece): the file as saved encodes differently, the engine as transformers does, and says which class."""
    from tokenizers import Tokenizer, normalizers

    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path / "cache"))
    path = _sentencepiece_checkpoint(tmp_path)
    legacy = Tokenizer.from_str(transformers.AutoTokenizer.from_pretrained(path).backend_tokenizer.to_str())
    legacy.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    legacy.pre_tokenizer = None
    legacy.save(str(path / "tokenizer.json"))

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    engine = Engine(path, dtype="float32")
    assert engine.provenance()["tokenizer"].startswith("tokenizer.json as transformers")
    assert "LlamaTokenizer" in engine.provenance()["tokenizer"]
    differs = 0
    for text in TEXTS:
        want = tokenizer(text)["input_ids"]
        differs += legacy.encode(text).ids != want
        (out,) = engine.generate([{"prompt": text}], SamplingParams(max_tokens=1), use_tqdm=False)
        assert out.prompt_token_ids == want
    assert differs  # the file as saved would have given other ids
