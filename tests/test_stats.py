"""cultengine.stats against published examples, hand-computed values and planted effects."""

import itertools
import math

import numpy as np
import pytest

from cultengine import stats
from cultengine.studies import stats as study_stats


@pytest.mark.parametrize(
    "k,n,low,high",
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3 (Wilson score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0000),
    ],
)
def test_wilson_matches_newcombe_1998(k, n, low, high):
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_by_hand():
    # 5/10, z = 1.96: centre 0.5; half = 1.96 / 1.38416 * sqrt(0.025 + 0.0096040) = 0.26340...
    z = 1.96
    half = z / (1 + z * z / 10) * math.sqrt(0.25 / 10 + z * z / 400)
    lo, hi = stats.wilson(5, 10, z)
    assert lo == pytest.approx(0.5 - half, abs=1e-12) and hi == pytest.approx(0.5 + half, abs=1e-12)
    assert half == pytest.approx(0.2634, abs=1e-4)


def test_proportion_independent_is_wilson_clustered_is_wider():
    correct = [True] * 30 + [False] * 30
    ind = stats.proportion(correct)
    assert ind.method == "wilson" and (ind.low, ind.high) == pytest.approx(stats.wilson(30, 60))
    # 15 images x 4 questions, each image all right or all wrong: in effect 15 observations, not 60
    clustered = stats.proportion(correct, clusters=[i // 4 for i in range(60)])
    assert clustered.method == "cluster bootstrap" and clustered.clusters == 15 and clustered.n == 60
    assert clustered.value == 0.5
    width = clustered.high - clustered.low
    normal_15 = 2 * 1.96 * math.sqrt(0.25 / 15)  # the interval of 15 independent observations
    assert width == pytest.approx(normal_15, rel=0.2) and width > 1.5 * (ind.high - ind.low)
    assert clustered.effective_n == pytest.approx(15, rel=0.15)  # design effect ~4: four copies of a verdict
    assert stats.proportion(correct, clusters=[i // 4 for i in range(60)]) == clustered  # seeded
    # clusters that mix right and wrong answers are no worse than independent questions: design effect 1
    mixed = stats.proportion([True, False] * 30, clusters=[i // 4 for i in range(60)])
    assert mixed.effective_n == 60 and (mixed.low, mixed.high) == pytest.approx(stats.wilson(30, 60))


def test_proportion_all_right_in_clusters_is_wilson_over_clusters():
    est = stats.proportion([True] * 40, clusters=[i // 4 for i in range(40)])
    assert est.method == "wilson over clusters" and est.value == 1.0
    assert (est.low, est.high) == pytest.approx(stats.wilson(10, 10))


def test_cluster_mean_interval_and_sign_flip_p():
    rng = np.random.default_rng(3)
    shifted = rng.normal(0.5, 1.0, 200)
    est = stats.cluster_mean(shifted)
    assert est.low < shifted.mean() < est.high and est.p < 0.01
    assert est.high - est.low == pytest.approx(2 * 1.96 * shifted.std() / math.sqrt(200), rel=0.15)
    # exactly symmetric values: the observed mean is 0, nothing to reject
    assert stats.cluster_mean([1.0, -1.0, 2.0, -2.0]).p == 1.0
    # NaN values are dropped; a single cluster has no interval
    assert stats.cluster_mean([1.0, float("nan"), 3.0]).value == 2.0
    one = stats.cluster_mean([0.2, 0.4], clusters=["item", "item"])
    assert one.value == pytest.approx(0.3) and math.isnan(one.low) and one.p is None


def test_group_gap_planted_and_null():
    correct = [True] * 90 + [False] * 10 + [True] * 40 + [False] * 60
    first = [True] * 100 + [False] * 100
    gap = stats.group_gap(correct, first)
    assert gap.value == pytest.approx(0.5) and gap.low < 0.5 < gap.high and gap.p < 0.001
    assert gap.p == pytest.approx(1 / (stats.PERMUTATIONS + 1))
    same = stats.group_gap([True, False] * 50 + [True, False] * 50, first)
    assert same.value == 0 and same.p == 1.0


def test_mcnemar_exact_by_hand():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.mcnemar_exact(7, 7) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(8, 2) == stats.mcnemar_exact(2, 8)


def test_paired_uses_mcnemar_for_independent_questions():
    a = [True] * 8 + [False] * 2 + [True] * 10
    b = [False] * 8 + [True] * 2 + [True] * 10
    out = stats.paired(a, b)
    assert out["test"] == "exact McNemar" and (out["only_a"], out["only_b"]) == (8, 2)
    assert out["p"] == pytest.approx(stats.mcnemar_exact(8, 2), abs=1e-6)
    assert out["value"] == pytest.approx(0.3)
    clustered = stats.paired(a, b, clusters=[i // 2 for i in range(20)])
    assert clustered["test"] == "cluster sign-flip permutation" and clustered["clusters"] == 10


def test_holm_by_hand():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def _brute_s(x, y):
    return sum(np.sign(x[j] - x[i]) * np.sign(y[j] - y[i]) for i, j in itertools.combinations(range(len(x)), 2))


def test_kendall_s_fenwick_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 30).astype(float)
    ys = rng.integers(1, 7, (6, 30))
    order = np.argsort(x, kind="stable")
    blocks = stats._dense_rank(x)[order]
    s = stats._kendall_s(order, blocks, ys, 6)
    assert s.tolist() == [_brute_s(x, y) for y in ys]


def _random_distances(rng, m, dims=3):
    p = rng.normal(size=(m, dims))
    return np.linalg.norm(p[:, None] - p[None], axis=2)


def test_mantel_tau_is_kendall_tau_b_of_the_pairs():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, (9, 9)).astype(float)
    b = rng.integers(0, 3, (9, 9)).astype(float)
    a, b = a + a.T, b + b.T
    iu = np.triu_indices(9, 1)
    assert stats.mantel(a, b, permutations=99).tau == pytest.approx(study_stats.kendall_tau_b(a[iu], b[iu]).tau)


def test_mantel_p_matches_full_enumeration():
    rng = np.random.default_rng(2)
    x, y = _random_distances(rng, 5), _random_distances(rng, 5)
    iu = np.triu_indices(5, 1)
    s_obs = abs(_brute_s(x[iu], y[iu]))
    exact = np.mean([abs(_brute_s(x[iu], y[np.ix_(p, p)][iu])) >= s_obs for p in itertools.permutations(range(5))])
    assert stats.mantel(x, y, permutations=9999).p == pytest.approx(exact, abs=0.015)


def test_mantel_planted_correlation_is_significant():
    rng = np.random.default_rng(4)
    d = _random_distances(rng, 37)
    noisy = d + rng.normal(scale=0.4, size=d.shape)
    noisy = (noisy + noisy.T) / 2
    r = stats.mantel(noisy, d)
    assert r.tau > 0.4 and r.p == pytest.approx(1 / 10000) and (r.pairs, r.objects) == (666, 37)
    assert r.permutations >= 9999 and stats.mantel(noisy, d) == r  # seeded


def test_mantel_unrelated_matrices_give_uniform_p():
    rng = np.random.default_rng(5)
    ps = [
        stats.mantel(_random_distances(rng, 8), _random_distances(rng, 8), permutations=199, seed=s).p
        for s in range(60)
    ]
    assert 0.35 < np.mean(ps) < 0.65
    assert np.mean(np.asarray(ps) < 0.1) < 0.25  # about 10 % expected
    assert np.mean(np.asarray(ps) < 0.5) == pytest.approx(0.5, abs=0.2)


def test_mantel_refuses_nan_and_shape_mismatch():
    with pytest.raises(ValueError, match="square"):
        stats.mantel(np.zeros((3, 3)), np.zeros((4, 4)))
    m = np.ones((4, 4))
    m[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        stats.mantel(m, np.ones((4, 4)))


def test_anova_effect_sizes_by_hand():
    # (1,2,3) (4,5,6) (7,8,9): SSB 54, SSW 6, SST 60, MSW 1 -> eta^2 = 0.9, omega^2 = (54 - 2) / 61
    a = study_stats.one_way_anova([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert a.eta_squared == pytest.approx(0.9) and a.omega_squared == pytest.approx(52 / 61)
