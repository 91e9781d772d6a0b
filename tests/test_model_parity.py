"""Our LLaVA (paged KV, packed batch) against transformers' LlavaForConditionalGeneration, fp32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cultengine.attention_metadata import AttentionMetadata
from cultengine.checkpoint import load_checkpoint
from cultengine.image import ClipImageProcessor
from cultengine.models import build_model, family_for
from cultengine.ops import Ops
from tiny_checkpoints import IMAGE_TOKEN, reference_model

TOL = 1e-4  # max |log_softmax(ours) - log_softmax(transformers)|
BLOCK = 4

PROMPTS = [  # (text with one <image> per image, image sizes (w, h, mode))
    ("<s>Answer with a single letter: A, B, C or D.", []),
    (
        "<s><|im_start|>user\n<image>\nWhat is shown in this picture? café 🎉<|im_end|>\n<|im_start|>assistant\n",
        [(37, 23, "RGB")],
    ),
    (
        "<|im_start|>user\nCompare <image> and <image>: Привет, 祭り.<|im_end|>\n<|im_start|>assistant\n",
        [(50, 31, "RGBA"), (29, 64, "L")],
    ),
]


def _image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


class Setup:
    def __init__(self, path):
        from tokenizers import Tokenizer

        self.ckpt = load_checkpoint(path, dtype="float32")
        self.family = family_for(self.ckpt)
        self.model = build_model(self.ckpt, Ops("torch"))
        self.proc = ClipImageProcessor(self.ckpt.preprocessor_config)
        self.tok = Tokenizer.from_file(str(self.ckpt.tokenizer_path))
        self.image_id = self.tok.token_to_id(IMAGE_TOKEN)
        assert self.image_id == self.family.placeholder_id

    def prompt(self, i: int):
        """(expanded ids, pixels [n, 3, S, S] or None, image spans [(start, len)])"""
        text, sizes = PROMPTS[i]
        ids, spans = [], []
        for t in self.tok.encode(text, add_special_tokens=False).ids:
            if t == self.image_id:
                spans.append((len(ids), self.family.tokens_per_tile))
                ids += [t] * self.family.tokens_per_tile
            else:
                ids.append(t)
        pixels = [self.proc(_image(w, h, m, seed=10 * i + j)) for j, (w, h, m) in enumerate(sizes)]
        assert len(spans) == len(pixels)
        return ids, (torch.stack(pixels) if pixels else None), spans


def _meta(chunks, block_size=BLOCK, max_blocks=16):
    """chunks: per sequence (context_len, n_new); sequence b owns contiguous blocks b*max_blocks.."""
    qsl, seq_lens, slots, positions = [0], [], [], []
    for b, (ctx, n) in enumerate(chunks):
        qsl.append(qsl[-1] + n)
        seq_lens.append(ctx + n)
        for p in range(ctx, ctx + n):
            positions.append(p)
            slots.append((b * max_blocks + p // block_size) * block_size + p % block_size)
    tables = torch.arange(len(chunks) * max_blocks, dtype=torch.int32).view(len(chunks), max_blocks)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(n for _, n in chunks),
        max_seq_len=max(seq_lens),
    )
    return meta, torch.tensor(positions, dtype=torch.int64)


def _image_rows(spans, embeds, row0, lo, hi):
    """Rows of packed tokens [lo, hi) of one sequence (packed at row0) that hold image tokens."""
    dst, src = [], []
    for (start, length), emb in zip(spans, embeds, strict=True):
        a, b = max(start, lo), min(start + length, hi)
        if a < b:
            dst.append(torch.arange(a, b) - lo + row0)
            src.append(emb[a - start : b - start])
    return dst, src


def _run(s: Setup, seqs, kv):
    """seqs: (ids, pixels, spans, lo, hi) per sequence; computes tokens [lo, hi) of each, packed."""
    meta, positions = _meta([(lo, hi - lo) for *_, lo, hi in seqs])
    all_ids, dst, src, row0 = [], [], [], 0
    for ids, pixels, spans, lo, hi in seqs:
        all_ids += ids[lo:hi]
        if pixels is not None:
            d, e = _image_rows(spans, s.model.tile_features(pixels), row0, lo, hi)
            dst += d
            src += e
        row0 += hi - lo
    rows = torch.cat(dst) if dst else None
    emb = torch.cat(src) if src else None
    hidden = s.model.forward(torch.tensor(all_ids), positions, kv, meta, rows, emb)
    return s.model.compute_logits(hidden).log_softmax(-1)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def setup(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param)
    return Setup(path), reference_model(path)


def _reference(ref, ids, pixels):
    with torch.inference_mode():
        out = ref(input_ids=torch.tensor([ids]), pixel_values=pixels)
    return out.logits[0].float().log_softmax(-1)


def test_packed_batch_matches_transformers(setup):
    s, ref = setup
    prompts = [s.prompt(i) for i in range(len(PROMPTS))]
    kv = s.model.allocate_kv_caches(num_blocks=16 * len(prompts), block_size=BLOCK)
    ours = _run(s, [(ids, px, sp, 0, len(ids)) for ids, px, sp in prompts], kv)
    row = 0
    for ids, pixels, _ in prompts:
        theirs = _reference(ref, ids, pixels)
        diff = (ours[row : row + len(ids)] - theirs).abs().max().item()
        assert diff < TOL, f"prompt of {len(ids)} tokens: max log-softmax diff {diff}"
        row += len(ids)


def test_chunked_prefill_and_decode_match_one_shot(setup):
    s, _ = setup
    ids, pixels, spans = s.prompt(2)
    kv = s.model.allocate_kv_caches(num_blocks=16, block_size=BLOCK)
    whole = _run(s, [(ids, pixels, spans, 0, len(ids))], kv)
    # Split inside the first image span so each chunk gets part of the image rows; then decode-like steps.
    split = spans[0][0] + 2
    kv = s.model.allocate_kv_caches(num_blocks=16, block_size=BLOCK)
    first = _run(s, [(ids, pixels, spans, 0, split)], kv)
    second = _run(s, [(ids, pixels, spans, split, len(ids) - 2)], kv)
    last = [_run(s, [(ids, pixels, spans, p, p + 1)], kv) for p in (len(ids) - 2, len(ids) - 1)]
    chunked = torch.cat([first, second, *last])
    assert (chunked - whole).abs().max().item() < TOL


def test_tokens_per_image_and_feature_shapes(setup):
    s, _ = setup
    c = s.family
    patches = (c.vision.image_size // c.vision.patch_size) ** 2
    expected = patches + (1 if c.select_strategy == "full" else 0)
    assert c.tokens_per_tile == expected
    px = torch.zeros(2, 3, c.vision.image_size, c.vision.image_size)
    assert s.model.tile_features(px).shape == (2, expected, c.text.hidden_size)


def test_bfloat16_load_runs(tiny_llama):
    ckpt = load_checkpoint(tiny_llama, dtype="bfloat16")
    model = build_model(ckpt, Ops("torch"))
    assert model.language_model.embed_tokens.dtype == torch.bfloat16
    meta, pos = _meta([(0, 5)])
    kv = model.allocate_kv_caches(16, BLOCK)
    hidden = model.forward(torch.arange(5), pos, kv, meta)
    assert hidden.dtype == torch.bfloat16 and model.compute_logits(hidden).dtype == torch.float32
