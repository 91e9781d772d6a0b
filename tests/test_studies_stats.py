"""Statistics of the studies against values computed by hand (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest

from cultengine.studies import stats


def test_js_similarity_by_hand():
    assert stats.js_similarity([1, 0], [0, 1]) == pytest.approx(0.0)
    assert stats.js_similarity([0.2, 0.8], [2, 8]) == pytest.approx(1.0)  # counts are normalised
    # p = (.5, .5), q = (1, 0), m = (.75, .25)
    # KL(p||m) = .5 log2(.5/.75) + .5 log2(.5/.25) = .5 (-0.5849625) + .5 = 0.2075187
    # KL(q||m) = log2(1/.75) = 0.4150375 ; JS = (0.2075187 + 0.4150375) / 2 = 0.3112781
    assert stats.js_similarity([0.5, 0.5], [1, 0]) == pytest.approx(1 - 0.3112781, abs=1e-6)


def test_betainc_closed_forms():
    # I_x(a, 1) = x^a ; I_x(1, b) = 1 - (1 - x)^b ; I_x(a, b) + I_{1-x}(b, a) = 1
    assert stats.betainc(3.0, 1.0, 0.1) == pytest.approx(0.001, rel=1e-10)
    assert stats.betainc(1.0, 4.0, 0.3) == pytest.approx(1 - 0.7**4, rel=1e-10)
    assert stats.betainc(2.5, 0.5, 0.9) + stats.betainc(0.5, 2.5, 0.1) == pytest.approx(1.0, abs=1e-12)
    # I_{1/2}(a, a) = 1/2 by symmetry
    assert stats.betainc(7.3, 7.3, 0.5) == pytest.approx(0.5, abs=1e-12)


def test_f_sf_closed_forms():
    # F(1, 1) = T^2 with T Cauchy: P(F > f) = 1 - (2/pi) atan(sqrt f); f = 1 -> 0.5
    assert stats.f_sf(1.0, 1, 1) == pytest.approx(0.5, abs=1e-12)
    assert stats.f_sf(3.0, 1, 1) == pytest.approx(1 - 2 / math.pi * math.atan(math.sqrt(3)), abs=1e-12)
    # F(1, 2) = T^2 with 2 df: P(|T| > t) = 1 - t / sqrt(2 + t^2); f = 2 -> 1 - sqrt(2)/2
    assert stats.f_sf(2.0, 1, 2) == pytest.approx(1 - math.sqrt(2) / 2, abs=1e-12)
    # F(2, d2): P(F > f) = (1 + 2 f / d2)^(-d2/2)
    assert stats.f_sf(4.5, 2, 10) == pytest.approx((1 + 2 * 4.5 / 10) ** -5, rel=1e-10)


def test_one_way_anova_by_hand():
    # groups (1,2,3) (4,5,6) (7,8,9): grand mean 5, group means 2 5 8
    # SSB = 3 (9 + 0 + 9) = 54, SSW = 3 * 2 = 6, F = (54/2) / (6/6) = 27
    # p = P(F(2, 6) > 27) = (1 + 2*27/6)^-3 = 10^-3
    a = stats.one_way_anova([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert (a.df_between, a.df_within) == (2, 6)
    assert a.ss_between == pytest.approx(54) and a.ss_within == pytest.approx(6)
    assert a.f == pytest.approx(27.0) and a.p == pytest.approx(1e-3, rel=1e-9)
    # unequal sizes: (2, 4) (6, 8, 10): grand mean 6, means 3 and 8
    # SSB = 2*9 + 3*4 = 30; SSW = 2 + 8 = 10; F = (30/1) / (10/3) = 9; p = P(F(1,3) > 9)
    b = stats.one_way_anova([[2, 4], [6, 8, 10]])
    assert b.f == pytest.approx(9.0)
    # F(1, 3) = T^2 with 3 df: P(|T| > 3) = 2 * (1 - CDF_t3(3)); CDF_t3 closed form:
    # 1/2 + (1/pi) [ t/(sqrt3 (1 + t^2/3)) + atan(t / sqrt3) ]
    t = 3.0
    cdf = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
    assert b.p == pytest.approx(2 * (1 - cdf), rel=1e-9)
    with pytest.raises(ValueError):
        stats.one_way_anova([[1, 2, 3]])


def test_kendall_tau_b_by_hand():
    # x = 1..5, y = 3 1 2 5 4: discordant pairs (1,2) (1,3) (4,5), the other 7 concordant
    # S = 4, tau = 4/10 ; var(S) = n(n-1)(2n+5)/18 = 5*4*15/18
    k = stats.kendall_tau_b([1, 2, 3, 4, 5], [3, 1, 2, 5, 4])
    assert k.tau == pytest.approx(0.4)
    assert k.p == pytest.approx(math.erfc(4 / math.sqrt(300 / 18) / math.sqrt(2)), rel=1e-12)
    # ties: x = 1 1 2 3, y = 1 2 2 3: C = 4, D = 0 (pairs tied in x or y count neither)
    # n0 = 6, n1 = n2 = 1 -> tau_b = 4 / sqrt(5 * 5) = 0.8
    # var = (4*3*13 - 2*1*9 - 2*1*9)/18 + (2 * 2)/(2*4*3) + 0 = 120/18 + 1/6
    k = stats.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3])
    assert k.tau == pytest.approx(0.8)
    assert k.z == pytest.approx(4 / math.sqrt(120 / 18 + 1 / 6))
    # perfectly reversed
    assert stats.kendall_tau_b([1, 2, 3], [3, 2, 1]).tau == pytest.approx(-1.0)


def test_tfidf_by_hand():
    # docs "a b" and "a c c": N = 2, df(a) = 2, df(b) = df(c) = 1
    # idf(a) = ln(3/3) + 1 = 1, idf(b) = idf(c) = ln(3/2) + 1 = 1.4054651
    m, vocab = stats.tfidf([["a", "b"], ["a", "c", "c"]])
    assert vocab == ["a", "b", "c"]
    idf_b = math.log(1.5) + 1
    row0 = np.array([0.5, 0.5 * idf_b, 0.0])
    row1 = np.array([1 / 3, 0.0, 2 / 3 * idf_b])
    np.testing.assert_allclose(m[0], row0 / np.linalg.norm(row0))
    np.testing.assert_allclose(m[1], row1 / np.linalg.norm(row1))
    assert stats.top_terms(m[1], vocab, 1) == [("c", pytest.approx(m[1, 2]))]
    m2, vocab2 = stats.tfidf([["the", "cat"]], stop_words=frozenset({"the"}))
    assert vocab2 == ["cat"] and m2[0, 0] == pytest.approx(1.0)


def test_words_and_lexical_features():
    assert stats.words("The cat's 3 hats, Ōsaka!") == ["the", "cat's", "hats", "ōsaka"]
    f = stats.lexical_features("the cat saw the dog")
    # 5 tokens, 4 types; characters 3+3+3+3+3 = 15
    assert f == {"length_words": 5.0, "type_token_ratio": 0.8, "mean_word_length": 3.0}


def test_cosine_and_euclidean():
    c = stats.cosine_matrix(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert c[0, 1] == pytest.approx(1 / math.sqrt(2)) and c[2, 0] == 0.0
    d = stats.euclidean_matrix(np.array([[0.0, 0.0], [3.0, 4.0], [np.nan, 1.0], [np.nan, np.nan]]))
    assert d[0, 1] == pytest.approx(5.0)
    # row 2 has one of two coordinates: |0 - 1| scaled by sqrt(2/1)
    assert d[0, 2] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(d[0, 3])


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.0, 0.0]])
    pos = np.array([[False, False, True], [True, False, False], [False, False, False]])
    # query 0: ranks 0, 2, 1 -> positive at rank 2; query 1: ranks 1, 0, 2 -> positive at rank 2
    assert stats.recall_at_k(sim, pos, 1) == 0.0
    assert stats.recall_at_k(sim, pos, 2) == 1.0
    assert math.isnan(stats.recall_at_k(sim, np.zeros_like(pos), 1))
