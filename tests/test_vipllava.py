"""ViP-LLaVA, the family added as one file (`models/vipllava.py`) plus one registry line: a tiny random
`VipLlavaForConditionalGeneration` (LLaVA-1.5's tiny tokenizer, template and CLIP processor; three feature layers,
a negative, a first and a positive index) against transformers: token ids, greedy tokens, log-probabilities and
choice scores, on images of several sizes and aspect ratios, on both image paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cultengine import Engine
from family_parity import CONVERSATIONS, assert_choice_scores_match, assert_generations_match, reference
from tiny_checkpoints import build_tiny_llava, perturb


def build_tiny_vipllava(out: Path, seed: int = 0) -> Path:
    import transformers as t

    build_tiny_llava(out, "llama", seed)
    llava = t.AutoConfig.from_pretrained(out)
    generation = (out / "generation_config.json").read_text()
    config = t.VipLlavaConfig(
        text_config=llava.text_config.to_dict(),
        vision_config=llava.vision_config.to_dict(),
        image_token_index=llava.image_token_index,
        vision_feature_layer=[-1, -3, 1],
        projector_layernorm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = t.VipLlavaForConditionalGeneration(config).eval()
    perturb(model, seed)
    for old in out.glob("*.safetensors*"):
        old.unlink()
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(generation)
    tokenizer = t.AutoTokenizer.from_pretrained(out)
    processor = t.LlavaProcessor(
        image_processor=t.CLIPImageProcessor(**json.loads((out / "preprocessor_config.json").read_text())),
        tokenizer=tokenizer,
        patch_size=llava.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vipllava(tmp_path_factory) -> Path:
    return build_tiny_vipllava(tmp_path_factory.mktemp("vipllava"))


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_vipllava_generates_and_scores_as_transformers(vipllava, backend):
    model, processor = reference(vipllava, backend)
    engine = Engine(vipllava, dtype="float32", image_backend=backend)
    assert engine.checkpoint.architecture == "VipLlavaForConditionalGeneration"
    assert engine.family.feature_layers == [-1, -3, 1]
    assert_generations_match(engine, model, processor, CONVERSATIONS)
    assert_choice_scores_match(engine, model, processor, CONVERSATIONS)
