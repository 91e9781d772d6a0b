"""Statistics for the studies, in numpy only (no scipy): every formula is written out here.

- `js_similarity`: 1 - Jensen-Shannon divergence (base 2, so it lies in [0, 1]).
- `one_way_anova`: F and its p-value, P(F(d1, d2) > F), from the regularized incomplete beta function
  (`betainc`, Lentz's continued fraction as in Numerical Recipes 6.4); effect sizes eta^2 = SSb / SSt and
  omega^2 = (SSb - dfb MSw) / (SSt + MSw) (less biased; can be below 0 for no effect).
- `kendall_tau_b`: tau-b and a two-sided p-value from the normal approximation of S = C - D with the
  tie-corrected variance (Kendall 1970, the formula scipy's `kendalltau(method="asymptotic")` uses).
- `tfidf`: tf = count / document length; idf = ln((1 + N) / (1 + df)) + 1 (smoothed); rows L2-normalised.
- `cosine_matrix`, `euclidean_matrix` (NaN-aware), `recall_at_k`, `clip_score`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


# ---------------------------------------------------------------- distributions
def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits; both inputs are normalised to sum to 1 first."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"distributions differ in shape: {p.shape} vs {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0 or (p < 0).any() or (q < 0).any():
        raise ValueError("distributions must be non-negative with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), 1.0)


def js_similarity(p: Sequence[float], q: Sequence[float]) -> float:
    return 1.0 - js_divergence(p, q)


def softmax(logits: Sequence[float]) -> list[float]:
    x = np.asarray(logits, dtype=np.float64)
    x = np.exp(x - x.max())
    return (x / x.sum()).tolist()


# ---------------------------------------------------------------- special functions
def _betacf(a: float, b: float, x: float, max_iter: int = 300, eps: float = 3e-16) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))  # even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if a <= 0 or b <= 0:
        raise ValueError("betainc needs a > 0 and b > 0")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast here
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def f_sf(f: float, d1: float, d2: float) -> float:
    """P(F(d1, d2) > f) = I_{d2 / (d2 + d1 f)}(d2 / 2, d1 / 2)."""
    if math.isnan(f):
        return float("nan")
    if f <= 0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return betainc(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f))


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


# ---------------------------------------------------------------- tests
@dataclass
class Anova:
    f: float
    p: float
    df_between: int
    df_within: int
    ss_between: float
    ss_within: float
    eta_squared: float
    omega_squared: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def one_way_anova(groups: Sequence[Sequence[float]]) -> Anova:
    """One-way ANOVA across groups (groups with no values are ignored)."""
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g) > 0]
    k = len(arrays)
    n = sum(len(a) for a in arrays)
    if k < 2 or n <= k:
        raise ValueError(f"ANOVA needs at least 2 groups and more values than groups (got {k} groups, {n} values)")
    grand = np.concatenate(arrays).mean()
    ss_between = float(sum(len(a) * (a.mean() - grand) ** 2 for a in arrays))
    ss_within = float(sum(((a - a.mean()) ** 2).sum() for a in arrays))
    df_b, df_w = k - 1, n - k
    if ss_within == 0.0:
        f = float("inf") if ss_between > 0 else float("nan")
    else:
        f = (ss_between / df_b) / (ss_within / df_w)
    ss_total = ss_between + ss_within
    ms_within = ss_within / df_w
    return Anova(
        f=f,
        p=f_sf(f, df_b, df_w),
        df_between=df_b,
        df_within=df_w,
        ss_between=ss_between,
        ss_within=ss_within,
        eta_squared=ss_between / ss_total if ss_total > 0 else float("nan"),
        omega_squared=(ss_between - df_b * ms_within) / (ss_total + ms_within) if ss_total > 0 else float("nan"),
    )


@dataclass
class KendallTau:
    tau: float
    p: float
    n: int
    z: float


def _tie_sums(x: np.ndarray) -> tuple[float, float, float]:
    """Sums over tie groups of t(t-1), t(t-1)(t-2) and t(t-1)(2t+5)."""
    _, counts = np.unique(x, return_counts=True)
    t = counts.astype(np.float64)
    return (
        float((t * (t - 1)).sum()),
        float((t * (t - 1) * (t - 2)).sum()),
        float((t * (t - 1) * (2 * t + 5)).sum()),
    )


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> KendallTau:
    """Kendall's tau-b with a two-sided p-value from the tie-corrected normal approximation."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("kendall_tau_b needs two 1-D sequences of the same length")
    n = len(x)
    if n < 2:
        return KendallTau(float("nan"), float("nan"), n, float("nan"))
    iu = np.triu_indices(n, k=1)
    s = float((np.sign(x[:, None] - x[None, :])[iu] * np.sign(y[:, None] - y[None, :])[iu]).sum())
    tx1, tx2, tx3 = _tie_sums(x)
    ty1, ty2, ty3 = _tie_sums(y)
    n0 = n * (n - 1) / 2.0
    denom = math.sqrt((n0 - tx1 / 2.0) * (n0 - ty1 / 2.0))
    if denom == 0:
        return KendallTau(float("nan"), float("nan"), n, float("nan"))
    tau = s / denom
    var = (n * (n - 1) * (2 * n + 5) - tx3 - ty3) / 18.0 + tx1 * ty1 / (2.0 * n * (n - 1))
    if n > 2:
        var += tx2 * ty2 / (9.0 * n * (n - 1) * (n - 2))
    z = s / math.sqrt(var) if var > 0 else float("nan")
    return KendallTau(tau=tau, p=normal_two_sided_p(z) if var > 0 else float("nan"), n=n, z=z)


# ---------------------------------------------------------------- text
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")

STOP_WORDS = frozenset(
    "a an and are as at be but by for from had has have he her hers him his i in into is it its me my "
    "of on or our she so that the their them then there they this to up was we were what when which "
    "who will with you your".split()
)


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters (any script), apostrophes inside a word kept."""
    return _WORD.findall(text.lower())


def lexical_features(text: str) -> dict[str, float]:
    """Length in words, type-token ratio and mean word length (characters)."""
    w = words(text)
    n = len(w)
    return {
        "length_words": float(n),
        "type_token_ratio": len(set(w)) / n if n else 0.0,
        "mean_word_length": sum(map(len, w)) / n if n else 0.0,
    }


def tfidf(documents: Sequence[Sequence[str]], stop_words: frozenset[str] = frozenset()) -> tuple[np.ndarray, list[str]]:
    """TF-IDF matrix [documents, vocabulary] of tokenised documents and its sorted vocabulary.

    tf = count / number of (kept) tokens in the document; idf = ln((1 + N) / (1 + df)) + 1; each row is
    L2-normalised (an empty document gives a zero row).
    """
    counts = [Counter(t for t in doc if t not in stop_words) for doc in documents]
    vocab = sorted(set().union(*counts)) if counts else []
    index = {t: i for i, t in enumerate(vocab)}
    tf = np.zeros((len(documents), len(vocab)))
    for d, c in enumerate(counts):
        total = sum(c.values())
        for t, k in c.items():
            tf[d, index[t]] = k / total
    df = (tf > 0).sum(axis=0)
    idf = np.log((1.0 + len(documents)) / (1.0 + df)) + 1.0
    w = tf * idf
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.divide(w, norms, out=np.zeros_like(w), where=norms > 0), vocab


def top_terms(row: np.ndarray, vocab: Sequence[str], k: int) -> list[tuple[str, float]]:
    order = sorted(np.flatnonzero(row > 0), key=lambda i: (-row[i], vocab[i]))[:k]
    return [(vocab[i], float(row[i])) for i in order]


# ---------------------------------------------------------------- geometry
def cosine_matrix(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity between the rows of a and the rows of b (a with itself if b is None)."""
    ua = cosine_rows(a)
    return ua @ (ua if b is None else cosine_rows(b)).T


def euclidean_matrix(x: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances between rows; NaN coordinates are skipped pairwise and the squared
    distance is scaled by (number of coordinates / number present in both) -- the "nan-euclidean" rule.
    A pair with no coordinate in common gets NaN."""
    x = np.asarray(x, dtype=np.float64)
    present = ~np.isnan(x)
    z = np.where(present, x, 0.0)
    both = present[:, None, :] & present[None, :, :]
    sq = (((z[:, None, :] - z[None, :, :]) ** 2) * both).sum(axis=2)
    n_common = both.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.sqrt(sq * x.shape[1] / n_common)
    d[n_common == 0] = np.nan
    return d


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """CLIPScore of matching rows: 100 * max(cos(image, text), 0) (Hessel et al. 2021, no 2.5 factor)."""
    return 100.0 * np.maximum(np.sum(cosine_rows(image_emb) * cosine_rows(text_emb), axis=1), 0.0)


def cosine_rows(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    m = np.asarray(m, dtype=np.float64)
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return np.divide(m, n, out=np.zeros_like(m), where=n > 0)


def recall_at_k(similarity: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Fraction of queries (rows) with at least one positive among their k most similar gallery items.
    Queries without any positive are left out; NaN if none is left."""
    similarity = np.asarray(similarity, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    has_pos = positive.any(axis=1)
    if not has_pos.any():
        return float("nan")
    k = min(k, similarity.shape[1])
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(positive, top, axis=1).any(axis=1)
    return float(hits[has_pos].mean())
