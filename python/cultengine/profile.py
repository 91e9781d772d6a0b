"""`cultengine profile`: throughput, latency and where the time goes, on a synthetic workload.

`--model` takes a checkpoint directory or a shape preset (`llava-1.5-7b`, `llava-next-7b`, `pangea-7b`,
`llava-onevision-7b`, `qwen2-7b`, `qwen2.5-vl-7b`, `qwen2.5-vl-72b`, `qwen3-vl-4b`, `smolvlm2-2.2b`,
`internvl3-8b`, `gemma-3-4b`, `gemma-3-12b`, `demo`) whose weights are drawn at load time, so real model sizes
can be profiled without downloading anything; their shapes come from the models' published config files where
the package ships them (`published/`). Presets have billions of parameters and need CUDA: on a CPU they are refused
unless `--allow-cpu`. `--dry-run` runs nothing: it plans memory (weight and KV-cache bytes) from the shapes,
on any machine.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .console import add_quiet, add_threads, positive_int

# numpy, torch and PIL are imported where they are used, so that `cultengine --help` loads none of them.

PUBLISHED = Path(__file__).resolve().parent / "published"  # config files as public checkpoints publish them


def _published(folder: str, file: str = "config.json") -> dict:
    return json.loads((PUBLISHED / folder / file).read_text(encoding="utf-8"))


# Shapes of public checkpoints: read from their published config files (published/SOURCES.md) where this package
# ships them; typed here (config.json fields) for the towers and decoders whose files it does not. Weights are
# random.
_LLAVA_15 = _published("llava-1.5-7b-hf")
_CLIP_L14_336 = _LLAVA_15["vision_config"]
_CLIP_336_PREPROCESSOR = _published("llava-1.5-7b-hf", "preprocessor_config.json")
# Qwen2.5-7B-Instruct's decoder: the Qwen2-7B shape (Pangea-7B, LLaVA-OneVision-7B, InternVL3-8B build on it).
_QWEN2_7B = {
    k: v
    for k, v in _published("Qwen2.5-7B-Instruct").items()
    if k not in ("architectures", "torch_dtype", "use_cache", "bos_token_id", "eos_token_id", "transformers_version")
}
_SIGLIP_SO400M_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
}
_LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"],
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}
_LLAVA_NEXT = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}
# SmolVLM2-2.2B-Instruct: SigLIP-so400m/14 on 384-px tiles, scale_factor 3 (81 tokens a tile), SmolLM2-1.7B.
_SMOLVLM2_2B = {
    "architectures": ["SmolVLMForConditionalGeneration"],
    "scale_factor": 3,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 49280,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 130000.0,
    },
    "vision_config": {**_SIGLIP_SO400M_384, "model_type": "smolvlm_vision", "num_hidden_layers": 27},
}
_SMOLVLM2_PREPROCESSOR = {
    "image_processor_type": "SmolVLMImageProcessor",
    "do_resize": True,
    "size": {"longest_edge": 1536},
    "max_image_size": {"longest_edge": 384},
    "do_image_splitting": True,
    "resample": 1,
    "do_rescale": True,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
# InternVL3-8B-hf: InternViT-300M-448px (256 tokens a tile, up to 12 tiles + thumbnail) and Qwen2.5-7B.
_INTERNVL3_8B = {
    "architectures": ["InternVLForConditionalGeneration"],
    "downsample_ratio": 0.5,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "text_config": {**_QWEN2_7B, "vocab_size": 151674},
    "vision_config": {
        "model_type": "internvl_vision",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 448,
        "patch_size": 14,
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
    },
}
_INTERNVL3_PREPROCESSOR = {
    "image_processor_type": "GotOcr2ImageProcessor",
    "size": {"height": 448, "width": 448},
    "min_patches": 1,
    "max_patches": 12,
    "resample": 3,
    "do_rescale": True,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


@dataclass(frozen=True)
class PresetTokens:
    """What a family whose prompts carry image markers adds to the demo tokenizer: its special tokens, the
    placeholder its chat template writes, and processor_config.json's fields."""

    special: tuple[str, ...]
    image_token: str
    processor: dict


_IDEFICS3_TOKENS = PresetTokens(
    (
        "<fake_token_around_image>",
        "<global-img>",
        "<end_of_utterance>",
        *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
    ),
    "<image>",
    {"processor_class": "SmolVLMProcessor", "image_seq_len": 81},
)
_INTERNVL_TOKENS = PresetTokens(
    ("<img>", "</img>", "<IMG_CONTEXT>"),
    "<IMG_CONTEXT>",
    {"processor_class": "InternVLProcessor", "image_seq_length": 256},
)


@dataclass(frozen=True)
class Published:
    """A preset that is a public checkpoint's own config files (`published/<folder>/`), with `changes` (nested
    config.json fields) for a larger size of the same model whose files this package does not ship."""

    folder: str
    changes: dict = field(default_factory=dict)


# name -> a public checkpoint's files (`Published`), or a combination of parts (published ones where this package
# has their files): (config.json fields over the demo's, preprocessor_config.json[, the family's tokens])
PRESETS: dict[str, tuple | Published] = {
    # a Qwen2-7B decoder behind CLIP-L/14-336 in the LLaVA-1.5 layout
    "qwen2-7b": ({**_LLAVA, "text_config": _QWEN2_7B, "vision_config": _CLIP_L14_336}, _CLIP_336_PREPROCESSOR),
    # llava-v1.6-mistral-7b: up to 4 tiles of 336 + the base tile (5 tiles)
    "llava-next-7b": (
        {**_LLAVA_NEXT, "text_config": _MISTRAL_7B, "vision_config": _CLIP_L14_336},
        {
            **_CLIP_336_PREPROCESSOR,
            "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor",
        },
    ),
    # Pangea-7B-hf: LLaVA-NeXT with a Qwen2-7B decoder (CLIP-L/14-336 tower, as LLaVA-NeXT)
    "pangea-7b": (
        {**_LLAVA_NEXT, "text_config": _QWEN2_7B, "vision_config": _CLIP_L14_336},
        {
            **_CLIP_336_PREPROCESSOR,
            "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor",
        },
    ),
    # llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m/14-384 and Qwen2-7B, anyres_max_9
    "llava-onevision-7b": (
        {
            "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "text_config": _QWEN2_7B,
            "vision_config": _SIGLIP_SO400M_384,
        },
        {
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "size": {"height": 384, "width": 384},
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "resample": 3,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    ),
    "smolvlm2-2.2b": (_SMOLVLM2_2B, _SMOLVLM2_PREPROCESSOR, _IDEFICS3_TOKENS),
    "internvl3-8b": (_INTERNVL3_8B, _INTERNVL3_PREPROCESSOR, _INTERNVL_TOKENS),
}


PRESETS.update(
    {
        "llava-1.5-7b": Published("llava-1.5-7b-hf"),
        "qwen2.5-vl-7b": Published("Qwen2.5-VL-7B-Instruct"),
        # Qwen2.5-VL-72B-Instruct: the 7B's files (the same tower, processor, rope) with its decoder's sizes
        "qwen2.5-vl-72b": Published(
            "Qwen2.5-VL-7B-Instruct",
            {
                "hidden_size": 8192,
                "intermediate_size": 29568,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "max_window_layers": 80,
                "vision_config": {"out_hidden_size": 8192},
            },
        ),
        "qwen3-vl-4b": Published("Qwen3-VL-4B-Instruct"),
        # gemma-3-4b-it / gemma-3-12b-it: SigLIP-so400m/14-896 pooled to 256 tokens; 5 sliding layers per full one
        "gemma-3-4b": Published("gemma-3-4b-it"),
        "gemma-3-12b": Published(
            "gemma-3-4b-it",
            {
                "text_config": {
                    "hidden_size": 3840,
                    "intermediate_size": 15360,
                    "num_hidden_layers": 48,
                    "num_attention_heads": 16,
                    "num_key_value_heads": 8,
                }
            },
        ),
    }
)


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merged(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def preset_checkpoint(name: str, out_dir: Path) -> Path:
    """A checkpoint directory with the preset's config and the demo tokenizer, no weight files."""
    from .bench import demo_checkpoint

    demo = demo_checkpoint.ensure()
    spec = PRESETS[name]
    # The demo's tokenizer and template; its model files only where the preset has none of its own.
    model_files = {"config.json", "model.safetensors.index.json"}
    if isinstance(spec, Published):
        model_files |= {"preprocessor_config.json", "processor_config.json"}
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in demo.iterdir():
        if f.suffix != ".safetensors" and f.name not in model_files:
            shutil.copy(f, out_dir / f.name)
    demo_cfg = json.loads((demo / "config.json").read_text())
    if isinstance(spec, Published):
        for f in (PUBLISHED / spec.folder).iterdir():
            shutil.copy(f, out_dir / f.name)
        config = _merged(_published(spec.folder), spec.changes)
        family_tokens = []
    else:
        fields, preprocessor, *family_tokens = spec
        config = {**demo_cfg, **fields, "text_config": {**fields["text_config"]}}
        (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    config["dtype"] = "bfloat16"
    # The demo tokenizer's ids (its image token included) must stay inside the preset's vocabulary.
    demo_vocab = demo_cfg["text_config"]["vocab_size"]
    text = config.get("text_config", config)  # transformers 4's Qwen2.5-VL layout: the text fields on top
    if "vocab_size" in text:
        text["vocab_size"] = max(text["vocab_size"], demo_vocab + 2)
    config["image_token_index"] = config["image_token_id"] = demo_cfg["image_token_index"]  # both names in use
    if family_tokens:
        config["image_token_id"] = _add_family_tokens(out_dir, family_tokens[0])
    if "mm_tokens_per_image" in config:  # Gemma 3: the demo's <image> opens an image; soft/end ids past its vocab
        config.update(
            boi_token_index=demo_cfg["image_token_index"],
            image_token_index=demo_vocab,
            image_token_id=demo_vocab,
            eoi_token_index=demo_vocab + 1,
        )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _add_family_tokens(out_dir: Path, tokens: PresetTokens) -> int:
    """Add a family's marker tokens to the copied demo tokenizer, make its chat template write the family's
    placeholder, write processor_config.json; returns the placeholder's id."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tokens.special])
    tok.save(str(out_dir / "tokenizer.json"))
    tc = json.loads((out_dir / "tokenizer_config.json").read_text())
    tc["chat_template"] = tc["chat_template"].replace("<image>", tokens.image_token)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out_dir / "processor_config.json").write_text(json.dumps(tokens.processor))
    return tok.token_to_id(tokens.image_token)


def _lengths(spec: str, n: int, rng: random.Random) -> list[int]:
    """`64` (fixed), `32:128` (uniform), or `exp:64` (exponential with that mean, at least 1)."""
    if spec.startswith("exp:"):
        mean = float(spec[4:])
        return [max(1, int(rng.expovariate(1 / mean))) for _ in range(n)]
    if ":" in spec:
        lo, hi = (int(x) for x in spec.split(":"))
        return [rng.randint(lo, hi) for _ in range(n)]
    return [int(spec)] * n


def _length_spec(text: str) -> str:
    """argparse type: a `_lengths` spec, checked before anything loads."""
    try:
        lengths = _lengths(text, 2, random.Random(0))
        ok = min(lengths) >= 1 and (not text.startswith("exp:") or float(text[4:]) > 0)
    except (ValueError, ZeroDivisionError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected N, LO:HI or exp:MEAN (positive numbers), got {text!r}")
    return text


def build_workload(engine, args) -> tuple[list[dict], list[int]]:
    """Synthetic requests: random words and noise images; a fraction share one image and prefix."""
    import numpy as np
    from PIL import Image

    rng = random.Random(args.seed)
    vocab = [engine.tokenizer.id_to_token(i) for i in range(min(engine.tokenizer.vocab_size, 4000))]
    words = [w.strip("Ġ▁ ") for w in vocab if w and w.strip("Ġ▁ ").isalpha()] or ["word"]
    size = engine.family.dummy_image().width
    prompt_lens = _lengths(args.prompt_len, args.num_requests, rng)
    output_lens = _lengths(args.output_len, args.num_requests, rng)

    def image(seed: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    shared_images = [image(10_000 + i) for i in range(args.images_per_request)]
    shared_prefix = text(max(prompt_lens) // 2)
    per_image = getattr(args, "prompts_per_image", 1)
    requests = []
    for i in range(args.num_requests):
        shared = rng.random() < args.shared_fraction
        # Runs of `per_image` requests ask about the same image(s), as benchmarks ask several
        # questions per picture.
        group = i // per_image
        imgs = shared_images if shared else [image(group * 31 + k) for k in range(args.images_per_request)]
        body = (shared_prefix + " " if shared else "") + text(prompt_lens[i])
        content = [{"type": "image", "image": im} for im in imgs] + [{"type": "text", "text": body}]
        req = {"messages": [{"role": "user", "content": content}]}
        if args.choices:
            req["choices"] = [" " + text(rng.randint(1, 4)) for _ in range(args.choices)]
        requests.append(req)
    return requests, output_lens


def _percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    arr = np.array(values) * 1000
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}


def memory_plan(model: str, dtype: str, max_model_len: int | None, gpu_memory_gib: float) -> dict:
    """Weight and KV-cache bytes of a checkpoint or preset, from its shapes alone (the model is built on the
    meta device: nothing is allocated or read), and whether one GPU of `gpu_memory_gib` holds them."""
    import torch

    from .checkpoint import load_checkpoint
    from .models import family_for

    ckpt = load_checkpoint(model, dtype=dtype, device="meta", random_init=True)
    family = family_for(ckpt)
    weights = []
    draw = ckpt.tensor
    ckpt.tensor = lambda name, shape=None: weights.append(draw(name, shape)) or weights[-1]  # count every weight
    built = family.build_model(None, max_positions=1)
    elem = torch.tensor([], dtype=ckpt.dtype).element_size()
    context = min(max_model_len or family.max_context, family.max_context)
    kv_per_token = 2 * built.num_layers * built.num_kv_heads * built.head_dim * elem
    weight_bytes = sum(w.numel() for w in weights) * elem
    need = weight_bytes + kv_per_token * context
    return {
        "model": model,
        "architecture": ckpt.architecture,
        "dtype": str(ckpt.dtype).removeprefix("torch."),
        "weight_gib": weight_bytes / 2**30,
        "kv_bytes_per_token": kv_per_token,
        "max_model_len": context,
        "kv_gib_per_full_sequence": kv_per_token * context / 2**30,
        "gpu_memory_gib": gpu_memory_gib,
        "fits_one_gpu": need <= gpu_memory_gib * 2**30,
        "full_sequences_per_gpu": max(0, int((gpu_memory_gib * 2**30 - weight_bytes) // (kv_per_token * context))),
    }


def format_memory_plan(p: dict) -> str:
    verdict = (
        "fits one GPU"
        if p["fits_one_gpu"]
        else "does NOT fit one GPU: it needs tensor parallelism (or a smaller dtype / max_model_len)"
    )
    return "\n".join(
        [
            f"cultengine profile --dry-run: {p['model']} ({p['architecture']}, {p['dtype']})",
            f"  weights                 {p['weight_gib']:.2f} GiB",
            f"  KV cache                {p['kv_bytes_per_token'] / 2**10:.0f} KiB per token, "
            f"{p['kv_gib_per_full_sequence']:.2f} GiB per {p['max_model_len']}-token sequence",
            f"  {'one ' + format(p['gpu_memory_gib'], '.0f') + ' GiB GPU':<22}  {verdict}; "
            f"{p['full_sequences_per_gpu']} full-length sequences beside the weights",
        ]
    )


def _device(args) -> str:
    """--device, else cuda when there is one; a shape preset on a CPU is refused (it would draw many GiB of
    weights and run for a very long time) unless --allow-cpu."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] == "cpu" and args.model in PRESETS and not getattr(args, "allow_cpu", False):
        raise ValueError(
            f"profile --model {args.model}: a preset of a real model's shapes (billions of parameters) "
            "needs CUDA; on a CPU it takes many GiB and a very long time. Use --dry-run to plan its "
            "memory, --model demo (or a small checkpoint) on a CPU, or --allow-cpu to run it anyway"
        )
    return device


def run_profile(args) -> dict:
    import torch

    from . import Engine, SamplingParams
    from .bench import demo_checkpoint

    device = _device(args)
    show_bar = not getattr(args, "quiet", False) and sys.stderr.isatty()

    tmp = None
    model = args.model
    if model in PRESETS:
        tmp = Path(tempfile.mkdtemp(prefix="cultengine-preset-"))
        model = str(preset_checkpoint(model, tmp))
    else:
        model = str(demo_checkpoint.resolve(model))
    try:
        engine = Engine(
            model,
            device=device,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            threads=getattr(args, "threads", None),
            max_num_batched_tokens=args.max_num_batched_tokens,
            attention_backend=args.backend,
            random_init=tmp is not None,
            profile=True,
            cuda_graphs=not args.no_cuda_graphs,
        )
        requests, output_lens = build_workload(engine, args)
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        before = engine.stats()
        start = time.perf_counter()
        if args.choices:
            outs = engine.score(requests, use_tqdm=show_bar)
        else:
            params = [
                SamplingParams(max_tokens=n, temperature=args.temperature, seed=i, ignore_eos=True)
                for i, n in enumerate(output_lens)
            ]
            outs = engine.generate(requests, params, use_tqdm=show_bar)
        wall = time.perf_counter() - start
        after = engine.stats()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float) and k in before}
    images = args.num_requests * args.images_per_request
    out_tokens = delta["generated_tokens"]
    timings = engine.latencies
    report = {
        "model": args.model,
        "device": str(engine.device),
        "dtype": str(engine.checkpoint.dtype).replace("torch.", ""),
        "backend": engine.ops.backend,
        "cuda_graphs": engine.runner.decode_graphs is not None,
        "workload": {
            k: getattr(args, k)
            for k in (
                "num_requests",
                "images_per_request",
                "prompts_per_image",
                "prompt_len",
                "output_len",
                "shared_fraction",
                "choices",
            )
        },
        "wall_seconds": wall,
        "requests_per_s": args.num_requests / wall,
        "input_tokens_per_s": delta["prompt_tokens"] / wall,
        "prefill_tokens_per_s": delta["prefill_tokens_computed"] / wall,
        "output_tokens_per_s": out_tokens / wall,
        "images_per_s": images / wall,
        "ttft_ms": _percentiles(timings["ttft"]),
        "tpot_ms": _percentiles(timings["tpot"]),
        "kv_cache_peak_use": after["peak_used_blocks"] / after["num_blocks"],
        "prefix_cache_hit_rate": delta["prefix_cache_hit_tokens"] / max(delta["prefix_cache_queried_tokens"], 1),
        "images_encoded": delta["images_encoded"],
        "time_breakdown_s": {k: round(v, 4) for k, v in engine.phase_seconds.items()},
        "scheduler_us_per_step": delta["schedule_ns"] / max(delta["steps"], 1) / 1000,
        "steps": delta["steps"],
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(engine.device)
            if engine.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**30,
    }
    return report


def format_report(r: dict) -> str:
    lines = [
        f"cultengine profile: {r['model']} on {r['device']} ({r['dtype']}, {r['backend']} backend"
        f"{', CUDA graphs' if r['cuda_graphs'] else ''})",
        f"workload: {r['workload']}",
        "",
    ]
    rows = [
        ("wall time", f"{r['wall_seconds']:.2f} s"),
        ("requests/s", f"{r['requests_per_s']:.2f}"),
        ("input tokens/s", f"{r['input_tokens_per_s']:.1f}"),
        ("prefill tokens/s (computed)", f"{r['prefill_tokens_per_s']:.1f}"),
        ("output tokens/s", f"{r['output_tokens_per_s']:.1f}"),
        ("images/s", f"{r['images_per_s']:.2f}"),
    ]
    for name in ("ttft_ms", "tpot_ms"):
        if r[name]:
            rows.append((name.replace("_ms", " (ms) p50/p90/p99"), " / ".join(f"{v:.1f}" for v in r[name].values())))
    rows += [
        ("KV cache peak use", f"{100 * r['kv_cache_peak_use']:.1f} %"),
        ("prefix-cache hit rate", f"{100 * r['prefix_cache_hit_rate']:.1f} %"),
        ("images encoded", str(r["images_encoded"])),
        ("scheduler CPU per step", f"{r['scheduler_us_per_step']:.1f} us over {r['steps']} steps"),
        ("peak memory", f"{r['peak_memory_gib']:.2f} GiB"),
    ]
    total = sum(r["time_breakdown_s"].values()) or 1.0
    rows += [(f"time: {k}", f"{v:.3f} s ({100 * v / total:.0f} %)") for k, v in r["time_breakdown_s"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(lines + [f"  {k:<{width}}  {v}" for k, v in rows])


def register(sub) -> None:
    p = sub.add_parser(
        "profile", help="throughput, latency and time breakdown on a synthetic workload", description=__doc__
    )
    p.add_argument(
        "--model",
        default="demo",
        help=f"checkpoint directory, 'demo', or a shape preset with random weights: {', '.join(PRESETS)}",
    )
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--allow-cpu", action="store_true", help="run a shape preset (billions of parameters) on a CPU")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--backend", default=None, help="torch | triton | flash (default: triton on CUDA, torch on CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (CUDA)")
    p.add_argument("--num-requests", type=positive_int, default=64, help="requests in the workload")
    p.add_argument("--images-per-request", type=int, default=1, help="noise images in each request")
    p.add_argument(
        "--prompt-len", type=_length_spec, default="32", help="words per prompt: N, LO:HI (uniform) or exp:MEAN"
    )
    p.add_argument("--output-len", type=_length_spec, default="32", help="tokens per output: N, LO:HI or exp:MEAN")
    p.add_argument(
        "--prompts-per-image",
        type=positive_int,
        default=1,
        help="consecutive requests asking about the same image(s), as benchmarks do",
    )
    p.add_argument(
        "--shared-fraction",
        type=float,
        default=0.5,
        help="fraction of requests sharing one image and a prompt prefix (prefix cache, encoder cache)",
    )
    p.add_argument("--choices", type=int, default=0, help="score this many choices per request instead of generating")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences the engine runs at once")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=8192, help="tokens per engine step")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    add_threads(p)
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan memory from the shapes only (weights, KV cache per token and per sequence)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context the --dry-run plan sizes the KV cache for")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="one GPU's memory, for --dry-run")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.dry_run:
        tmp = Path(tempfile.mkdtemp(prefix="cultengine-preset-")) if args.model in PRESETS else None
        try:
            model = str(preset_checkpoint(args.model, tmp) if tmp else args.model)
            plan = memory_plan(
                model,
                "bfloat16" if args.dtype == "auto" and tmp else args.dtype,
                args.max_model_len,
                args.gpu_memory_gib,
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        print(
            json.dumps({**plan, "model": args.model}, indent=2)
            if args.json
            else format_memory_plan({**plan, "model": args.model})
        )
        return 0
    report = run_profile(args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    sys.stdout.flush()
    return 0
