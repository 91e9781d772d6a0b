"""Inference statistics for the bench, study and comparison reports (numpy only, every formula written out).

One place for the uncertainty of every reported number, since bench, the studies and `compare` all use it:

- `wilson`: the Wilson score interval of a proportion (Wilson 1927; Newcombe 1998, method 3).
- `proportion`: a proportion with its 95 % interval: Wilson when the observations are independent; when some
  share a cluster (the questions of one image), Wilson at the effective sample size n / design effect, the
  design effect measured by a cluster bootstrap (resampling whole clusters).
- `cluster_mean`: the mean of per-observation values with a cluster-bootstrap percentile interval and a
  two-sided cluster sign-flip permutation p-value for "mean = 0" (paired differences).
- `group_gap`: difference of two groups' proportions: stratified cluster-bootstrap interval, p-value from a
  permutation test of the group labels over clusters.
- `paired`: two models on the same questions: the accuracy difference with a paired cluster-bootstrap
  interval; p from the exact McNemar test when questions are independent, else the cluster sign-flip test.
- `mantel`: Mantel permutation test between two distance/similarity matrices, permuting the objects
  (countries) of one matrix, Kendall's tau-b over the pairs as the statistic.
- `holm`: Holm's step-down adjustment of a family of p-values.

Everything is seeded: the same inputs give the same intervals and p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal
BOOTSTRAP = 2000  # resamples for percentile intervals
PERMUTATIONS = 9999  # permutations for p-values (p is never below 1 / (PERMUTATIONS + 1))
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % interval, sample size and the method that produced the interval."""

    value: float
    low: float
    high: float
    n: int
    method: str
    clusters: int | None = None
    p: float | None = None
    effective_n: float | None = None  # n over the design effect, for clustered proportions

    def as_dict(self, digits: int = 6) -> dict:
        out = {k: (round(v, digits) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- proportions
def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (no continuity correction); n may be an effective
    (non-integer) sample size."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _cluster_index(clusters: Sequence | None, n: int) -> np.ndarray:
    """Dense cluster ids 0..C-1 (each observation its own cluster when `clusters` is None)."""
    if clusters is None:
        return np.arange(n)
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster keys for {n} observations")
    _, idx = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    return idx.reshape(-1)


def _bootstrap_means(sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Ratio means sum(w * sums) / sum(w * counts) for `n_boot` cluster resamples w (with replacement)."""
    c = len(sums)
    out = np.empty(n_boot)
    step = max(1, 2_000_000 // max(c, 1))  # bound the resample matrix to a few MB
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        draws = rng.integers(0, c, size=(b, c))
        out[start : start + b] = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return out


def _percentile(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(lo), float(hi)


def proportion(
    correct: Sequence[bool], clusters: Sequence | None = None, n_boot: int = BOOTSTRAP, seed: int = SEED
) -> Estimate:
    """The proportion of True with a 95 % interval.

    Independent observations (no cluster holds two): Wilson. Otherwise (the questions of one image are not
    independent) the variance comes from a cluster bootstrap, resampling whole clusters, scaled by C / (C - 1)
    for C clusters; its ratio to the binomial variance is the design effect (at least 1), and the interval is
    Wilson's at the effective sample size n / design effect. Unlike bootstrap percentiles, this neither
    collapses to a point nor to [0, 1] for a group of a few images. All right (or all wrong) leaves no variance
    to measure: Wilson over the number of clusters, the conservative bound that counts each cluster once.
    """
    x = np.asarray(correct, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, "none")
    idx = _cluster_index(clusters, n)
    counts = np.bincount(idx).astype(np.float64)
    c, k = len(counts), float(x.sum())
    p = k / n
    if c == n:
        return Estimate(p, *wilson(k, n), n, "wilson")
    if p in (0.0, 1.0) or c < 2:
        return Estimate(p, *wilson(p * c, c), n, "wilson over clusters", clusters=c, effective_n=c)
    sums = np.bincount(idx, weights=x)
    boot = _bootstrap_means(sums, counts, n_boot, np.random.default_rng(seed))
    design_effect = max(1.0, float(boot.var()) * c / (c - 1) / (p * (1 - p) / n))
    n_eff = n / design_effect
    return Estimate(p, *wilson(p * n_eff, n_eff), n, "cluster bootstrap", clusters=c, effective_n=n_eff)


def _sign_flip_p(sums: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
    """Two-sided p of "the cluster totals are symmetric about 0": flip each cluster's sign at random."""
    observed = abs(sums.sum())
    if observed == 0:
        return 1.0
    hits, step = 0, max(1, 2_000_000 // max(len(sums), 1))
    for start in range(0, permutations, step):
        b = min(step, permutations - start)
        signs = rng.integers(0, 2, size=(b, len(sums))) * 2 - 1
        hits += int((np.abs(signs @ sums) >= observed - 1e-12).sum())
    return (hits + 1) / (permutations + 1)


def cluster_mean(
    values: Sequence[float],
    clusters: Sequence | None = None,
    n_boot: int = BOOTSTRAP,
    permutations: int = PERMUTATIONS,
    seed: int = SEED,
) -> Estimate:
    """Mean with a cluster-bootstrap percentile interval and the sign-flip p-value of "mean = 0"."""
    x = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(x)  # a missing value drops that observation, not its cluster
    x, idx = x[keep], np.unique(_cluster_index(clusters, len(keep))[keep], return_inverse=True)[1].reshape(-1)
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, "none")
    sums, counts = np.bincount(idx, weights=x), np.bincount(idx).astype(np.float64)
    if len(counts) < 2:  # one cluster: no spread to resample, nothing to test
        return Estimate(float(x.mean()), float("nan"), float("nan"), n, "too few clusters", clusters=1)
    rng = np.random.default_rng(seed)
    boot = _bootstrap_means(sums, counts, n_boot, rng)
    method = "bootstrap" if len(counts) == n else "cluster bootstrap"
    return Estimate(
        float(x.mean()), *_percentile(boot), n, method, clusters=len(counts), p=_sign_flip_p(sums, permutations, rng)
    )


# ---------------------------------------------------------------- two groups, two models
def group_gap(
    correct: Sequence[bool],
    in_first: Sequence[bool],
    clusters: Sequence | None = None,
    n_boot: int = BOOTSTRAP,
    permutations: int = PERMUTATIONS,
    seed: int = SEED,
) -> Estimate:
    """Proportion in the first group minus the second's.

    Interval: stratified cluster bootstrap (clusters resampled within each group). p: two-sided permutation
    test, the group labels shuffled over the clusters (a cluster in both groups counts as two units).
    """
    x = np.asarray(correct, dtype=np.float64)
    g = np.asarray(in_first, dtype=bool)
    keys = list(range(len(x))) if clusters is None else [str(c) for c in clusters]
    units = _cluster_index([f"{int(a)}|{k}" for a, k in zip(g, keys, strict=True)], len(x))
    sums, counts = np.bincount(units, weights=x), np.bincount(units).astype(np.float64)
    first = np.bincount(units, weights=g.astype(np.float64)) > 0
    if not first.any() or first.all():
        return Estimate(float("nan"), float("nan"), float("nan"), len(x), "none")
    gap = sums[first].sum() / counts[first].sum() - sums[~first].sum() / counts[~first].sum()
    rng = np.random.default_rng(seed)
    boot = _bootstrap_means(sums[first], counts[first], n_boot, rng) - _bootstrap_means(
        sums[~first], counts[~first], n_boot, rng
    )
    hits, step = 0, max(1, 2_000_000 // len(sums))
    for start in range(0, permutations, step):
        b = min(step, permutations - start)
        mask = rng.permuted(np.tile(first.astype(np.float64), (b, 1)), axis=1)  # shuffled group labels
        a = (mask @ sums) / (mask @ counts) - ((1 - mask) @ sums) / ((1 - mask) @ counts)
        hits += int((np.abs(a) >= abs(gap) - 1e-12).sum())
    method = "bootstrap" if len(sums) == len(x) else "cluster bootstrap"
    return Estimate(
        float(gap),
        *_percentile(boot),
        len(x),
        f"stratified {method}; permutation p",
        clusters=len(sums),
        p=(hits + 1) / (permutations + 1),
    )


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p for b and c discordant pairs: 2 P(Binomial(b + c, 1/2) <= min(b, c))."""
    m = b + c
    if m == 0:
        return 1.0
    lo = min(b, c)
    log_terms = [
        math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2) for i in range(lo + 1)
    ]
    top = max(log_terms)
    return min(1.0, 2.0 * math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def paired(
    a_correct: Sequence[bool],
    b_correct: Sequence[bool],
    clusters: Sequence | None = None,
    n_boot: int = BOOTSTRAP,
    permutations: int = PERMUTATIONS,
    seed: int = SEED,
) -> dict:
    """Accuracy of model A minus model B on the same questions, with its paired interval and p-value."""
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired comparison needs the same questions for both models")
    diff = cluster_mean(a - b, clusters, n_boot, permutations, seed)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    out = {**diff.as_dict(), "only_a": only_a, "only_b": only_b}
    if diff.clusters == diff.n:
        out.update(p=round(mcnemar_exact(only_a, only_b), 6), test="exact McNemar")
    else:
        out["test"] = "cluster sign-flip permutation"
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    adj = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


# ---------------------------------------------------------------- Mantel test
@dataclass(frozen=True)
class Mantel:
    """Kendall's tau-b between the upper triangles of two matrices, and its Mantel permutation p-value."""

    tau: float
    p: float
    permutations: int
    objects: int
    pairs: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def _dense_rank(v: np.ndarray) -> np.ndarray:
    return np.unique(v, return_inverse=True)[1].reshape(v.shape) + 1


def _kendall_s(x_order: np.ndarray, x_block: np.ndarray, y_ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """S = sum over pairs i<j of sign(x_j - x_i) sign(y_j - y_i), for many y rows at once.

    `x_order` sorts the pairs by x, `x_block` numbers its tie blocks; y_ranks is [rows, pairs] of dense ranks
    1..max_rank. A Fenwick tree per row counts, for each element in x order, the earlier elements (strictly
    smaller x) with smaller and larger y: O(pairs * log) vectorised over the rows.
    """
    rows = y_ranks.shape[0]
    levels = max_rank.bit_length() + 1
    width = (1 << levels) + 1  # room for every index an insert walks through, so no step needs a mask
    tree = np.zeros(rows * width, dtype=np.int32)
    base = np.arange(rows, dtype=np.int64) * width
    s = np.zeros(rows, dtype=np.int64)
    inserted = 0

    def prefix(pos: np.ndarray) -> np.ndarray:  # number inserted with rank <= pos, per row
        total = np.zeros(rows, dtype=np.int64)
        for _ in range(levels):  # index 0 holds nothing, so finished rows add 0
            total += tree[base + pos]
            pos = pos - (pos & -pos)
        return total

    def insert(pos: np.ndarray) -> None:
        for _ in range(levels):  # past max_rank the walk only touches padding no query reads
            tree[base + pos] += 1
            pos = np.minimum(pos + (pos & -pos), width - 1)

    start = 0
    while start < len(x_order):
        end = start
        while end < len(x_order) and x_block[end] == x_block[start]:
            end += 1
        block = [y_ranks[:, x_order[i]] for i in range(start, end)]
        for y in block:  # the tied-x elements of a block are compared only with earlier blocks
            below, upto = prefix(y - 1), prefix(y)
            s += below - (inserted - upto)
        for y in block:
            insert(y)
        inserted += end - start
        start = end
    return s


def mantel(x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS, seed: int = SEED) -> Mantel:
    """Mantel test of two symmetric [objects, objects] matrices (distances or similarities).

    Statistic: Kendall's tau-b between the matrices' upper-triangle entries. Null distribution: the objects
    of `y` relabelled by a random permutation (rows and columns together), which keeps each matrix's
    structure, unlike treating the pairs as independent observations. Two-sided p = (1 + #{|S_perm| >= |S|})
    / (1 + permutations); the tau-b denominator is the same under every permutation, so S decides.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        # none or fewer would give p = 1 / (1 + permutations) >= 1, or a negative p
        raise ValueError(f"Mantel test permutations must be an integer >= 1, got {permutations!r}")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = x.shape[0]
    if x.shape != (m, m) or y.shape != (m, m):
        raise ValueError(f"Mantel test needs two square matrices of the same size, got {x.shape} and {y.shape}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("Mantel test matrices must not contain NaN (drop the objects lacking data first)")
    iu = np.triu_indices(m, k=1)
    xv = x[iu]
    pairs = len(xv)
    if m < 3:
        return Mantel(float("nan"), float("nan"), 0, m, pairs, seed)
    x_order = np.argsort(xv, kind="stable")
    x_block = _dense_rank(xv)[x_order]
    y_rank_matrix = _dense_rank(y)
    max_rank = int(y_rank_matrix.max())

    def ties(v: np.ndarray) -> float:
        t = np.unique(v, return_counts=True)[1].astype(np.float64)
        return float((t * (t - 1) / 2).sum())

    n0 = pairs * (pairs - 1) / 2
    denom = math.sqrt((n0 - ties(xv)) * (n0 - ties(y[iu])))
    if denom == 0:
        return Mantel(float("nan"), float("nan"), 0, m, pairs, seed)
    observed = int(_kendall_s(x_order, x_block, y_rank_matrix[iu][None, :], max_rank)[0])
    rng = np.random.default_rng(seed)
    hits, chunk = 0, 2000
    for start in range(0, permutations, chunk):
        b = min(chunk, permutations - start)
        perm = np.argsort(rng.random((b, m)), axis=1)
        ranks = y_rank_matrix[perm[:, iu[0]], perm[:, iu[1]]]
        hits += int((np.abs(_kendall_s(x_order, x_block, ranks, max_rank)) >= abs(observed)).sum())
    return Mantel(observed / denom, (hits + 1) / (permutations + 1), permutations, m, pairs, seed)
