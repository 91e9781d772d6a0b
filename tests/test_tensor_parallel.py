"""Tensor parallelism on the CPU (gloo): 2 and 4 ranks give the tokens and log-probs of 1 rank, for every family's
decoder (LLaVA on Llama / Qwen2 / Mistral, LLaVA-NeXT, LLaVA-OneVision, ViP-LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Idefics3, SmolVLM, InternVL, Gemma 3 and its text-only model, a text-only LLM), GQA with fewer KV heads than ranks
included; a dead worker is a clear error with no process left behind; a model whose heads do not split is
refused naming the file; close() stops every worker."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from PIL import Image

from cultengine import Engine, SamplingParams
from cultengine.errors import CheckpointError
from test_vipllava import build_tiny_vipllava
from tiny_checkpoints import build_tiny_anyres, build_tiny_llava
from tiny_gemma import build_tiny_gemma3, build_tiny_gemma3_text, build_tiny_text
from tiny_qwen import build_tiny_qwen
from tiny_tiles import build_tiny_tiles

WIDE, TALL = Image.new("RGB", (60, 24), (200, 30, 90)), Image.new("RGB", (22, 50), (20, 160, 40))


def _requests(image_token: str | None) -> list[dict]:
    text = [{"messages": [{"role": "user", "content": "Tell me about the festival of lights."}]}]
    if image_token is None:
        return text
    images = [
        {"type": "image", "image": WIDE},
        {"type": "text", "text": "Which country is this from?"},
    ]
    two = [{"type": "image", "image": WIDE}, {"type": "text", "text": "and"}, {"type": "image", "image": TALL}]
    return text + [
        {"messages": [{"role": "user", "content": images}]},
        {"messages": [{"role": "user", "content": two}]},
    ]


def _run(engine: Engine, image_token: str | None):
    reqs = _requests(image_token)
    gen = engine.generate(reqs, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    scored = engine.score([{**r, "choices": [" red", " a flag of blue"]} for r in reqs], use_tqdm=False)
    for out in [*gen, *scored]:
        assert out.error is None, out.error
    return gen, scored


def _assert_same(one, many) -> None:
    (gen1, score1), (gen_n, score_n) = one, many
    for a, b in zip(gen1, gen_n, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.samples[0].token_ids == b.samples[0].token_ids
        torch.testing.assert_close(
            torch.tensor(a.samples[0].logprobs), torch.tensor(b.samples[0].logprobs), atol=1e-4, rtol=0
        )
    for a, b in zip(score1, score_n, strict=True):
        for ca, cb in zip(a.choices, b.choices, strict=True):
            torch.testing.assert_close(
                torch.tensor(ca.token_logprobs), torch.tensor(cb.token_logprobs), atol=1e-4, rtol=0
            )


BUILDERS = {
    "llava-llama": lambda out: build_tiny_llava(out, "llama"),
    "llava-qwen2": lambda out: build_tiny_llava(out, "qwen2"),  # q/k/v biases, untied lm_head
    "llava-mistral": lambda out: build_tiny_llava(out, "mistral"),  # head_dim set apart from hidden / heads
    "llava-next": lambda out: build_tiny_anyres(out, "llava_next"),
    "llava-onevision": lambda out: build_tiny_anyres(out, "llava_onevision"),
    "vipllava": build_tiny_vipllava,
    "qwen2-vl": lambda out: build_tiny_qwen(out, "qwen2_vl"),
    "qwen2.5-vl": lambda out: build_tiny_qwen(out, "qwen2_5_vl"),  # M-RoPE
    "qwen3-vl": lambda out: build_tiny_qwen(out, "qwen3_vl"),  # q/k norms, DeepStack added inside the decoder
    "idefics3": lambda out: build_tiny_tiles(out, "idefics3"),
    "smolvlm": lambda out: build_tiny_tiles(out, "smolvlm"),
    "internvl": lambda out: build_tiny_tiles(out, "internvl"),
    "gemma3": build_tiny_gemma3,  # its own norms and layer body on the shared decoder
    "gemma3-text": build_tiny_gemma3_text,  # soft-capped logits
    "qwen2-text": lambda out: build_tiny_text(out, "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_two_ranks_match_one(name, tmp_path):
    path = BUILDERS[name](tmp_path / name)
    one = Engine(path, dtype="float32")
    image_token = one.image_token
    expected = _run(one, image_token)
    with_two = Engine(path, dtype="float32", tensor_parallel_size=2)
    try:
        assert with_two.provenance()["settings"]["tensor_parallel_size"] == 2
        _assert_same(expected, _run(with_two, image_token))
    finally:
        with_two.close()


def test_four_ranks_replicate_kv_heads_when_fewer_than_ranks(tiny_llama):
    """4 query heads and 2 KV heads over 4 ranks: each rank holds one query head and the KV head it reads."""
    one = Engine(tiny_llama, dtype="float32")
    expected = _run(one, one.image_token)
    four = Engine(tiny_llama, dtype="float32", tensor_parallel_size=4)
    try:
        assert four.model.num_heads == 1 and four.model.num_kv_heads == 1
        _assert_same(expected, _run(four, one.image_token))
    finally:
        four.close()
    assert not multiprocessing.active_children()


def test_heads_that_do_not_split_are_refused_naming_the_file(tiny_llama):
    with pytest.raises(CheckpointError, match=r"config\.json.*do not split over 3 ranks"):
        Engine(tiny_llama, dtype="float32", tensor_parallel_size=3)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("cultengine-tp")]


def test_a_dead_worker_is_an_error_and_leaves_no_process(tiny_llama):
    engine = Engine(tiny_llama, dtype="float32", tensor_parallel_size=2)
    reqs = _requests(None)
    assert engine.generate(reqs, SamplingParams(max_tokens=2), use_tqdm=False)[0].error is None
    (worker,) = engine.workers.procs
    worker.kill()
    worker.join(timeout=10)
    with pytest.raises(RuntimeError, match="tensor parallel worker died"):
        engine.generate(reqs, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("cultengine-tp")]
    # The process can start another tensor-parallel engine afterwards.
    again = Engine(tiny_llama, dtype="float32", tensor_parallel_size=2)
    try:
        assert again.generate(reqs, SamplingParams(max_tokens=2), use_tqdm=False)[0].error is None
    finally:
        again.close()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("cultengine-tp")]


def test_dry_run_plans_one_ranks_share_of_the_72b_preset(capsys):
    """136.7 GiB of Qwen2.5-VL-72B weights do not fit one 80 GiB GPU; over 4 ranks each holds its quarter of the
    decoder plus the replicated embeddings, lm_head and vision tower, and a quarter of the KV heads."""
    from cultengine import cli

    plans = {}
    for n in (1, 4):
        argv = ["profile", "--model", "qwen2.5-vl-72b", "--dry-run", "--json", "--tensor-parallel-size", str(n)]
        assert cli.main(argv) == 0
        plans[n] = __import__("json").loads(capsys.readouterr().out)
    one, four = plans[1], plans[4]
    assert not one["fits_one_gpu"] and one["weight_gib"] == pytest.approx(136.7, abs=0.1)
    assert four["fits_one_gpu"] and four["tensor_parallel_size"] == 4
    assert one["weight_gib"] / 4 < four["weight_gib"] < one["weight_gib"] / 3  # the replicated part on each
    assert four["kv_bytes_per_token"] * 4 == one["kv_bytes_per_token"]  # 8 KV heads: 2 a rank
    assert four["full_sequences_per_gpu"] >= 1


def test_the_cli_passes_the_flag_to_the_engine(tiny_llama, capsys):
    from cultengine import cli

    argv = ["profile", "--model", str(tiny_llama), "--device", "cpu", "--json", "--num-requests", "2"]
    assert cli.main([*argv, "--output-len", "2", "--tensor-parallel-size", "2"]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["output_tokens_per_s"] > 0
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("cultengine-tp")]
