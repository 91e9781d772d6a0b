"""Each study end to end on the embedded demo checkpoint through the CLI, and the CLIP towers against
transformers."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cultengine.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cultengine.bench import demo_checkpoint

    return str(demo_checkpoint.ensure(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    for name, color in (("market.png", (200, 30, 30)), ("temple.png", (30, 30, 200))):
        Image.new("RGB", (64, 48), color).save(d / name)
    return d


def test_values_cli(demo, images, tmp_path):
    (tmp_path / "items.jsonl").write_text(
        json.dumps(
            {
                "id": "q1",
                "question": "How important is family?",
                "options": ["Very", "Rather", "Not"],
                "topic": "family",
            }
        )
        + "\n"
    )
    (tmp_path / "human.csv").write_text("item_id,country,distribution\nq1,Japan,5|3|2\nq1,Peru,6|3|1\n")
    (tmp_path / "imgs.csv").write_text(
        f"country,category,image\nJapan,food,{images / 'market.png'}\nPeru,place,{images / 'temple.png'}\n"
    )
    args = [
        "values",
        "--model",
        demo,
        "--out",
        str(tmp_path / "run"),
        "--items",
        str(tmp_path / "items.jsonl"),
        "--human",
        str(tmp_path / "human.csv"),
        "--images",
        str(tmp_path / "imgs.csv"),
        "--allowed-local-media-path",  # the images lie beside, not under, the data file
        str(images),
    ]
    assert main(args) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["num_records"] == 4 and s["num_errors"] == 0
    assert 0.0 <= s["mean_similarity_text"] <= 1.0
    assert {r["category"] for r in s["image_minus_text"]} == {"food", "place"}
    assert main(args) == 0  # resume: nothing rescored
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["scored_this_run"] == 0


def test_stories_cli_and_analysis(demo, images, tmp_path):
    run = tmp_path / "run"
    args = [
        "stories",
        "--model",
        demo,
        "--out",
        str(run),
        "--concepts",
        "rain,a festival",
        "--images",
        str(images),
        "--nationalities",
        "Japanese,German,Peruvian,Kenyan",
        "--samples",
        "2",
        "--max-tokens",
        "12",
    ]
    assert main(args) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["stories_total"] == 2 * 2 * 4 * 2 * 2
    assert s["prefill_tokens_saved"] > 0  # the image prefix is shared across nationalities
    assert (
        main(
            [
                "analyze",
                "stories",
                str(run),  # the packaged Hofstede and WVS tables by default
            ]
        )
        == 0
    )
    a = json.loads((run / "analysis.json").read_text())
    (m,) = a["models"].values()
    assert {x["table"] for x in m["alignment"]} == {"hofstede", "wvs"}
    assert m["alignment"][0]["lacking"] == ["Kenyan"]
    assert "<svg" in (run / "analysis.html").read_text()


def test_ground_cli(demo, images, tmp_path):
    (tmp_path / "ents.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {
                    "id": "e1",
                    "entity": "sushi",
                    "country": "Japan",
                    "image": str(images / "market.png"),
                    "properties": {"country_of_origin": "Japan", "made_from": "rice"},
                },
                {
                    "id": "e2",
                    "entity": "temple",
                    "country": "Peru",
                    "image": str(images / "temple.png"),
                    "properties": {"located_in": "Cusco"},
                },
            ]
        )
    )
    args = [
        "ground",
        "--model",
        demo,
        "--out",
        str(tmp_path / "run"),
        "--input",
        str(tmp_path / "ents.jsonl"),
        "--languages",
        "en,es",
        "--threshold",
        "0.0",
        "--allowed-local-media-path",
        str(images),
    ]
    assert main(args) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["rows"] == 6 and s["kept"] + sum(s["dropped_per_stage"].values()) == 6
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rows_this_run"] == 0


# ------------------------------------------------------------------------------------------------ CLIP
def _tiny_clip(out: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["a story about rain in the market", "the temple festival for a child"] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"]),
    )
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            eos_token_id=eos,
            bos_token_id=bos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}})
    )
    return out


def test_clip_towers_match_transformers(images, tmp_path):
    import torch
    import transformers

    from cultengine.studies.clip_score import ClipModel

    path = _tiny_clip(tmp_path / "clip")
    ours = ClipModel(path)
    ref = transformers.CLIPModel.from_pretrained(path).eval()
    texts = [
        "a story about rain",
        "the temple festival for a child in the market " * 4,
    ]  # the second is truncated
    ids = [ours.tokenize(t) for t in texts]
    assert len(ids[1]) == 16 and ids[1][-1] == ours.eos_id
    got = ours.encode_text(texts)
    with torch.no_grad():
        for i, x in enumerate(ids):
            want = ref.get_text_features(input_ids=torch.tensor([x]))
            want = getattr(want, "pooler_output", want)
            want = torch.nn.functional.normalize(want, dim=-1)[0].numpy()
            np.testing.assert_allclose(got[i], want, atol=1e-5)
        pix = torch.stack(ours.processor.preprocess([images / "market.png", images / "temple.png"]))
        want = ref.get_image_features(pixel_values=pix)
        want = torch.nn.functional.normalize(getattr(want, "pooler_output", want), dim=-1).numpy()
    np.testing.assert_allclose(ours.encode_images([images / "market.png", images / "temple.png"]), want, atol=1e-5)
