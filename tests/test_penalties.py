"""Repetition, presence and frequency penalties: the sampler's rule against transformers' logits processor and
vLLM's formula, and the engine's greedy output with a repetition penalty token-identical to transformers'
`generate(repetition_penalty=...)`, with overlapped scheduling on and off (a pending token is penalized too)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cultengine import Engine, SamplingParams
from cultengine.sampling import penalized, sample


def _plan(sample_indices, penalty_rows, histories, prompt_lens, rep, presence, frequency, prev=((), ())):
    loc = np.cumsum([0, *map(len, histories)])
    return SimpleNamespace(
        sample_indices=np.asarray(sample_indices, dtype=np.int64),
        penalty_rows=np.asarray(penalty_rows, dtype=np.int64),
        penalty_token_loc=loc.astype(np.int64),
        penalty_tokens=np.asarray([t for h in histories for t in h], dtype=np.int64),
        penalty_prompt_lens=np.asarray(prompt_lens, dtype=np.int64),
        repetition_penalty=np.asarray(rep, dtype=np.float32),
        presence_penalty=np.asarray(presence, dtype=np.float32),
        frequency_penalty=np.asarray(frequency, dtype=np.float32),
        prev_input_rows=np.asarray(prev[0], dtype=np.int64),
        prev_sample_index=np.asarray(prev[1], dtype=np.int64),
    )


def test_repetition_penalty_is_transformers_rule_and_other_rows_are_untouched():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=gen) * 3
    history = [4, 9, 9, 17, 30, 4]
    plan = _plan([5, 11, 20], [1], [history], [3], [1.3], [0.0], [0.0])
    out = penalized(logits, plan, None)
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits[1:2].clone())
    torch.testing.assert_close(out[1:2], want)
    torch.testing.assert_close(out[[0, 2]], logits[[0, 2]])
    assert penalized(logits, _plan([5], [], [], [], [], [], []), None) is None


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.zeros(1, 10)
    # prompt [1, 2, 2], output [2, 5, 5, 5]
    plan = _plan([0], [0], [[1, 2, 2, 2, 5, 5, 5]], [3], [1.0], [0.5], [0.25])
    out = penalized(logits, plan, None)[0]
    assert out[1] == 0  # in the prompt only
    assert out[2] == pytest.approx(-(0.5 + 0.25))
    assert out[5] == pytest.approx(-(0.5 + 3 * 0.25))
    assert out[[0, 3, 4, 6]].abs().max() == 0


def test_a_pending_token_counts_as_an_output_token():
    logits = torch.zeros(2, 10)
    # Sample row 1 (input row 7) decodes the previous step's pick 1 (token 6), not yet among the known tokens.
    plan = _plan([3, 7], [1], [[1, 2]], [2], [1.0], [0.0], [1.0], prev=([7], [1]))
    out = penalized(logits, plan, torch.tensor([8, 6]))
    assert out[1, 6] == -1 and out[1, [1, 2]].abs().max() == 0 and out[0].abs().max() == 0


def test_logprobs_stay_those_of_the_model_and_picks_follow_the_penalty():
    logits = torch.tensor([[0.0, 5.0, 4.9]])
    plan = _plan([0], [0], [[1]], [1], [2.0], [0.0], [0.0])
    adjusted = penalized(logits, plan, None)
    cols = (np.zeros(1), np.ones(1), -np.ones(1, dtype=np.int32), np.zeros(1, dtype=np.int64), np.zeros(1))
    tokens, lps = sample(logits, *cols, adjusted)
    assert tokens.tolist() == [2]
    assert lps.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item())


def test_penalty_ranges_are_checked():
    for bad in (dict(repetition_penalty=0), dict(presence_penalty=2.5), dict(frequency_penalty=-3)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    from tiny_gemma import build_tiny_text

    return build_tiny_text(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM")


@pytest.mark.parametrize("overlap", [True, False])
def test_greedy_with_repetition_penalty_matches_transformers_generate(text_checkpoint, overlap):
    import transformers as t

    model = t.AutoModelForCausalLM.from_pretrained(text_checkpoint, dtype=torch.float32).eval()
    tok = t.AutoTokenizer.from_pretrained(text_checkpoint)
    engine = Engine(text_checkpoint, dtype="float32", generation_config="none", overlap_scheduling=overlap)
    prompts = ["the the the cat", "a story of lights and lights", "Tell me"]
    outs = engine.generate(
        [{"prompt": p} for p in prompts],
        SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8, ignore_eos=True),
        use_tqdm=False,
    )
    plain = engine.generate(
        [{"prompt": p} for p in prompts], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False
    )
    changed = 0
    for p, out, off in zip(prompts, outs, plain, strict=True):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = model.generate(
                ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=1.8, eos_token_id=None
            )[0, ids.shape[1] :].tolist()
        assert out.token_ids == want
        changed += out.token_ids != off.token_ids
    assert changed  # the penalty did change some greedy output
