"""Overlapped scheduling (`Engine(overlap_scheduling=True)`, the default on CUDA) against the synchronous loop.

Step N+1 is scheduled and launched before step N's tokens reach the host; its decode rows read their
input ids from step N's sampled tokens on the device. Whatever stops a sequence at step N (EOS, a stop
token or string, max_tokens, an abort, a failed step) must leave the outputs of the synchronous loop.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cultengine import Engine, SamplingParams
from tiny_checkpoints import IMAGE_TOKEN

LOGPROB_ATOL = 1e-5


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


PROMPTS = [
    {"prompt": "Tell me about the festival of lights."},
    {"prompt": f"{IMAGE_TOKEN}\nWhich country is this dish from?", "images": [_image(40, 30, 1)]},
    {"prompt": "Short one."},
    {"prompt": "Another prompt, a little longer than the short one, to chunk and to preempt."},
]


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """(overlapped, synchronous) engines on the same checkpoint."""
    return tuple(Engine(tiny_llama, dtype="float32", overlap_scheduling=on) for on in (True, False))


def _same(a, b) -> None:
    """Token ids, texts and finish reasons equal; per-token log-probabilities within 1e-5."""
    assert a.error is None and b.error is None
    assert len(a.samples) == len(b.samples)
    for x, y in zip(a.samples, b.samples, strict=True):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=LOGPROB_ATOL, rtol=0)


def _both(engines, requests, params):
    on, off = (e.generate(requests, params, use_tqdm=False) for e in engines)
    for a, b in zip(on, off, strict=True):
        _same(a, b)
    assert engines[0].scheduler.num_in_flight == 0 and not engines[0].scheduler.has_unfinished()
    return on


def test_greedy_and_seeded_sampling_are_identical_with_mixed_lengths(engines):
    params = [
        SamplingParams(max_tokens=1, ignore_eos=True),
        SamplingParams(max_tokens=9, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, seed=3, n=3, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, top_k=20, seed=8, ignore_eos=True),
    ]
    out = _both(engines, PROMPTS, params)
    assert [len(s.token_ids) for o in out for s in o.samples] == [1, 9, 4, 4, 4, 12]
    assert len({tuple(s.token_ids) for s in out[2].samples}) > 1  # n samples differ


def test_stops_found_one_step_late_on_the_host_cut_where_the_synchronous_loop_does(engines):
    full = engines[1].generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    # A stop token and a stop string that each end a sequence mid-way, while the next step is in flight.
    stop_token = full[0].token_ids[3]
    stop_text = full[3].text[3:5]
    params = SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token], stop=[stop_text])
    out = _both(engines, PROMPTS, params)
    assert out[0].finish_reason == "stop" and len(out[0].token_ids) <= 4
    assert out[3].finish_reason == "stop" and stop_text not in out[3].text


def test_eos_sampled_while_the_next_step_is_in_flight(engines, tiny_llama, tmp_path):
    full = engines[1].generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    eos = full[2].token_ids[2]  # a token the model emits mid-way: made the checkpoint's EOS
    path = tmp_path / "eos"
    shutil.copytree(tiny_llama, path)
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": eos}))
    pair = [Engine(path, dtype="float32", overlap_scheduling=on) for on in (True, False)]
    out = _both(pair, PROMPTS, SamplingParams(max_tokens=12))
    stopped = full[2].token_ids[: full[2].token_ids.index(eos) + 1]
    assert out[2].finish_reason == "stop" and out[2].token_ids == stopped and len(stopped) < 12


def test_preemption_under_a_tiny_kv_budget_changes_nothing(tiny_llama):
    params = SamplingParams(max_tokens=14, temperature=0.8, seed=2, n=2, ignore_eos=True)
    tight = [
        Engine(tiny_llama, dtype="float32", block_size=4, num_blocks=20, max_model_len=80, overlap_scheduling=on)
        for on in (True, False)
    ]
    _both(tight, PROMPTS * 2, params)
    assert tight[0].stats()["num_preemptions"] > 0
    assert tight[0].stats()["num_free_blocks"] == 20


def test_scoring_is_unaffected(engines):
    reqs = [
        {**PROMPTS[1], "choices": ["Japan", "Italy", "a very long answer indeed"]},
        {"prompt": "The capital of France is", "choices": [" Paris", " Rome"]},
    ]
    on, off = (e.score(reqs, use_tqdm=False) for e in engines)
    for a, b in zip(on, off, strict=True):
        for x, y in zip(a.choices, b.choices, strict=True):
            assert x.is_greedy == y.is_greedy
            np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_aborting_a_sequence_with_a_step_in_flight_frees_it_and_leaves_the_others(engines):
    engine, sync = engines
    params = dict(max_tokens=10, ignore_eos=True)
    expected = sync.generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    preps = engine.prepare(PROMPTS)
    ids = [engine.add_request(p, **params) for p in preps]
    outputs = {}
    for _ in range(3):  # the third step is launched; the second's results applied
        outputs.update((f.seq_id, f) for f in engine.step()[0])
    assert engine.scheduler.num_in_flight == 1
    assert engine.scheduler.abort(ids[1]).finish_reason == "abort"
    engine.release(ids[1])
    while engine.scheduler.has_unfinished() or engine._in_flight is not None:
        outputs.update((f.seq_id, f) for f in engine.step()[0])
    for i in (0, 2, 3):
        engine.release(ids[i])
        assert list(outputs[ids[i]].output_token_ids) == expected[i].token_ids
    assert ids[1] not in outputs
    assert engine.stats()["num_free_blocks"] == engine.runner.num_blocks


def test_a_failed_step_leaves_nothing_in_flight_and_the_next_call_is_exact(engines, monkeypatch):
    engine, sync = engines
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4, ignore_eos=True)
    expected = sync.generate(PROMPTS, params, use_tqdm=False)
    calls = []
    real = engine.runner.execute

    def execute(plan, synchronize=False, **kwargs):
        calls.append(len(plan.prev_input_rows))
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return real(plan, synchronize, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", execute)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(PROMPTS, params, use_tqdm=False)
    assert any(calls[:3])  # the steps before the failure did read tokens from the step before them
    assert engine._in_flight is None and engine.scheduler.num_in_flight == 0
    assert not engine.scheduler.has_unfinished()
    for a, b in zip(engine.generate(PROMPTS, params, use_tqdm=False), expected, strict=True):
        _same(a, b)


def test_the_demo_engine_is_identical_on_and_off():
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=1, n=2, ignore_eos=True)
    demo = [Engine("demo", overlap_scheduling=on) for on in (True, False)]
    _both(demo, ["Once upon a time", "The quick brown fox"], params)


def test_the_default_overlaps_on_cuda_only(tiny_llama):
    """On a CPU the forward pass runs in the launching thread: nothing could overlap, so the default is the
    synchronous loop there; asked for, it overlaps anyway."""
    assert not Engine(tiny_llama, dtype="float32").overlap_scheduling
    assert Engine(tiny_llama, dtype="float32", overlap_scheduling=True).overlap_scheduling
