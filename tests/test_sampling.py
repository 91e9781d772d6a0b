"""The sampler: greedy, truncation, batch invariance of seeded sampling, and its distribution."""

import pytest
import torch

from cultengine.sampling import SamplingParams, sample, uniform_noise


def _cols(n, temperature=1.0, top_p=1.0, top_k=-1, seed=7, index=0):
    return (
        torch.full((n,), temperature),
        torch.full((n,), top_p),
        torch.full((n,), top_k, dtype=torch.int32),
        torch.full((n,), seed, dtype=torch.int64),
        torch.full((n,), index, dtype=torch.int64),
    )


def test_greedy_picks_argmax_and_reports_raw_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    tokens, lps = sample(logits, *_cols(2, temperature=0.0))
    assert tokens.tolist() == [1, 0]
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 0]]
    torch.testing.assert_close(lps, expected)


def test_seeded_row_is_independent_of_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    t, p, k, s, i = _cols(6, temperature=0.9)
    s = torch.arange(6, dtype=torch.int64) * 1000 + 3
    alone = [sample(logits[r : r + 1], t[:1], p[:1], k[:1], s[r : r + 1], i[:1])[0].item() for r in range(6)]
    batched = sample(logits, t, p, k, s, i)[0].tolist()
    assert batched == alone
    # Shuffled batch order, same per-row answers.
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = sample(logits[perm], t, p, k, s[perm], i)[0].tolist()
    assert shuffled == [alone[r] for r in perm.tolist()]


def test_noise_depends_on_seed_and_output_index():
    a = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 1000)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert float(a.min()) > 0 and float(a.max()) < 1
    assert abs(float(a.mean()) - 0.5) < 0.03


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    n = logits.shape[0]
    seeds = torch.arange(n, dtype=torch.int64)
    t, p, k, _, i = _cols(n, top_k=2)
    assert set(sample(logits, t, p, k, seeds, i)[0].tolist()) <= {0, 1}
    t, p, k, _, i = _cols(n, top_p=0.7)  # nucleus: 0.5 + 0.3 reaches 0.7 -> tokens {0, 1}
    assert set(sample(logits, t, p, k, seeds, i)[0].tolist()) == {0, 1}
    t, p, k, _, i = _cols(n, top_p=0.4)  # the top token alone already covers 0.4
    assert set(sample(logits, t, p, k, seeds, i)[0].tolist()) == {0}


def test_sampling_follows_the_tempered_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 20000
    logits = torch.log(probs).repeat(n, 1)
    t, p, k, _, i = _cols(n)
    tokens = sample(logits, t, p, k, torch.arange(n, dtype=torch.int64), i)[0]
    freq = torch.bincount(tokens, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.015)
    # Temperature 0.5 squares and renormalises the probabilities.
    t = torch.full((n,), 0.5)
    tokens = sample(logits, t, p, k, torch.arange(n, dtype=torch.int64), i)[0]
    sharp = probs**2 / (probs**2).sum()
    assert torch.allclose(torch.bincount(tokens, minlength=3).float() / n, sharp, atol=0.015)


def test_sampling_params_validate_and_derive_distinct_seeds():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    seeds = SamplingParams(seed=5, n=4).sample_seeds()
    assert len(set(seeds)) == 4 and seeds == SamplingParams(seed=5, n=4).sample_seeds()
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_large_vocabulary_is_sampled_in_row_chunks_with_the_same_result():
    vocab = 1 << 21  # 4 rows per noise chunk
    logits = torch.randn(10, vocab, generator=torch.Generator().manual_seed(1))
    t, p, k, _, i = _cols(10, temperature=0.7)
    seeds = torch.arange(10, dtype=torch.int64) + 100
    batched = sample(logits, t, p, k, seeds, i)[0]
    alone = torch.cat([sample(logits[r : r + 1], t[:1], p[:1], k[:1], seeds[r : r + 1], i[:1])[0] for r in range(10)])
    assert torch.equal(batched, alone)
