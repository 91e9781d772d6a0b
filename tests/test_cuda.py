"""The engine on a CUDA GPU: Triton kernels and CUDA-graph decode against transformers and the torch path.

Skipped without a GPU (CI has none); run on one with `pytest tests/test_cuda.py tests/test_kernels.py`.
fp32 keeps the 1e-4 bar of the CPU tests: the Triton kernels force IEEE fp32 dots and torch's CUDA
matmuls default to full fp32. bf16 is compared with fp32 on teacher-forced choice log-likelihoods,
where one rounding of the weights and activations to 8 mantissa bits moves a log-probability of a tiny
random model (logits of order 1) by a few 1e-3: the bar is 0.05 per token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cultengine import Engine, SamplingParams
from test_engine import REQUESTS, Reference, _image
from tiny_checkpoints import IMAGE_TOKEN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Eleven requests whose answers end at different steps: decode batches of 11 down to 1 replay graphs
# captured for 16, 8, 4, 2 and 1 sequences, so padding rows are exercised at every size.
MANY = [
    {"prompt": f"{IMAGE_TOKEN}\nQuestion {i} about this picture.", "images": [_image(30 + i, 40, i)]}
    if i % 2
    else {"prompt": f"Question {i}: tell me a story about the sea."}
    for i in range(11)
]
MANY_PARAMS = [SamplingParams(max_tokens=1 + 2 * i, ignore_eos=True) for i in range(11)]


def _generate(path, requests, params, **engine_kw):
    engine = Engine(path, device="cuda", dtype="float32", **engine_kw)
    return engine, engine.generate(requests, params, use_tqdm=False)


def test_cuda_greedy_is_token_identical_to_transformers(tiny_llama):
    engine, outs = _generate(tiny_llama, REQUESTS, SamplingParams(max_tokens=10))
    assert engine.ops.backend == "triton" and engine.runner.decode_graphs is not None
    assert engine.runner.decode_graphs.replays > 0
    ref = Reference(tiny_llama)  # on the CPU, fp32
    for req, out in zip(REQUESTS, outs, strict=True):
        ids, pixels = ref.encode(req)
        assert out.error is None and out.prompt_token_ids == ids
        expected = ref.greedy(ids, pixels, 10)
        assert out.token_ids == expected
        lp = ref.logprobs(ids + expected, pixels)
        want = lp[len(ids) - 1 : -1].gather(1, torch.tensor(expected)[:, None]).squeeze(1)
        np.testing.assert_allclose(out.logprobs, want.numpy(), atol=1e-4)


def test_cuda_graphs_triton_and_torch_paths_agree(tiny_qwen2):
    runs = {}
    for name, kw in (("graphs", {}), ("eager", {"cuda_graphs": False}), ("torch", {"attention_backend": "torch"})):
        engine, runs[name] = _generate(tiny_qwen2, MANY, MANY_PARAMS, max_num_batched_tokens=64, **kw)
        assert (engine.runner.decode_graphs is not None) == (name == "graphs")
    for other in ("eager", "torch"):
        for got, want in zip(runs["graphs"], runs[other], strict=True):
            assert got.token_ids == want.token_ids
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_cuda_graph_sampling_is_batch_invariant(tiny_llama):
    params = [SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=i) for i in range(11)]
    _, batched = _generate(tiny_llama, MANY, params)
    _, alone = _generate(tiny_llama, MANY[3:4], params[3:4], cuda_graphs=False)
    assert batched[3].token_ids == alone[0].token_ids


def test_cuda_bf16_choice_loglikelihoods_are_close_to_fp32(tiny_llama):
    choices = ["Japan", " Peru", "Ghana and more"]
    reqs = [{**r, "choices": choices} for r in REQUESTS]
    bf16 = Engine(tiny_llama, device="cuda", dtype="bfloat16").score(reqs, use_tqdm=False)
    fp32 = Engine(tiny_llama, device="cuda", dtype="float32", attention_backend="torch").score(reqs, use_tqdm=False)
    diffs = []
    for a, b in zip(bf16, fp32, strict=True):
        assert a.error is None and b.error is None
        for ca, cb in zip(a.choices, b.choices, strict=True):
            diffs += [abs(x - y) for x, y in zip(ca.token_logprobs, cb.token_logprobs, strict=True)]
    print(f"bf16 vs fp32 per-token logprob: max |diff| {max(diffs):.4f}, mean {np.mean(diffs):.4f}")
    assert max(diffs) < 0.05


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_cuda_tiling_families_match_the_cpu_torch_path(family, tmp_path):
    """LLaVA-NeXT / OneVision on CUDA (Triton kernels, CUDA-graph decode) against the CPU torch path, fp32;
    bf16 runs and stays within 0.05 per token of fp32 on choice log-likelihoods."""
    from test_anyres_families import CONVERSATIONS
    from tiny_checkpoints import build_tiny_anyres

    path = build_tiny_anyres(tmp_path / family, family)
    reqs = [{"messages": m} for m in CONVERSATIONS]
    params = SamplingParams(max_tokens=8)
    cpu = Engine(path, dtype="float32").generate(reqs, params, use_tqdm=False)
    engine, cuda = _generate(path, reqs, params)
    assert engine.runner.decode_graphs is not None and engine.runner.decode_graphs.replays > 0
    for got, want in zip(cuda, cpu, strict=True):
        assert got.error is None and got.token_ids == want.token_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    scored = [{**r, "choices": ["Japan", " Peru"]} for r in reqs[1:3]]
    fp32 = engine.score(scored, use_tqdm=False)
    bf16 = Engine(path, device="cuda", dtype="bfloat16").score(scored, use_tqdm=False)
    for a, b in zip(fp32, bf16, strict=True):
        for ca, cb in zip(a.choices, b.choices, strict=True):
            assert abs(ca.logprob - cb.logprob) <= 0.05 * ca.num_tokens


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_overlapped_scheduling_matches_the_synchronous_loop(tiny_llama, cuda_graphs):
    """Step N+1's decode rows read step N's tokens on the device (in the graphs' static buffers too)."""
    params = [
        SamplingParams(max_tokens=1 + 2 * i, temperature=0.8 * (i % 2), seed=i, ignore_eos=True) for i in range(11)
    ]
    runs = [_generate(tiny_llama, MANY, params, cuda_graphs=cuda_graphs, overlap_scheduling=on) for on in (True, False)]
    assert (runs[0][0].runner.decode_graphs is not None) == cuda_graphs
    for on, off in zip(runs[0][1], runs[1][1], strict=True):
        assert on.token_ids == off.token_ids
        np.testing.assert_allclose(on.logprobs, off.logprobs, atol=1e-5, rtol=0)
    assert runs[0][0].scheduler.num_in_flight == 0


def test_cuda_cascade_graphs_match_plain_decode(tiny_llama):
    """One image asked 24 ways (the stories workload in small): graphs with shared-prefix tiles, greedy
    picks inside the graph, against the plain eager decode."""
    image = _image(64, 48, 3)
    reqs = [
        {"prompt": f"{IMAGE_TOKEN}\nTell a story about a person from country {i}.", "images": [image]}
        for i in range(24)
    ]
    params = [
        SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0 if i % 2 else 0.8, seed=i) for i in range(24)
    ]
    cascade, outs = _generate(tiny_llama, reqs, params)
    assert cascade.runner.decode_graphs.replays > 0
    stats = cascade.stats()
    assert stats["decode_kv_keys_read"] < 0.5 * stats["decode_kv_keys_plain"]
    _, plain = _generate(tiny_llama, reqs, params, cuda_graphs=False, cascade_attention=False)
    for got, want in zip(outs, plain, strict=True):
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
