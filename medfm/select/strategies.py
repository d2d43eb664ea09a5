"""Which examples to label next: cold-start strategies that need only embeddings, and active-learning ones that
need a model's class probabilities.

Every strategy takes l2-normalised embeddings (N, D) of the whole pool (labelled items included, so that their
coverage counts), the positions already labelled, a budget and a seed, and returns exactly ``budget`` new
positions, none already labelled, the same for the same seed. Cold start (no model):

* ``random``: the control;
* ``kmeans``: k-means with ``budget`` clusters on the unlabelled pool, the item nearest each centre;
* ``typiclust``: TypiClust (Hacohen et al., "Active Learning on a Budget", ICML 2022): k-means with
  ``labelled + budget`` clusters; from the largest cluster with the fewest labels, the most typical item
  (highest inverse mean distance to its 20 nearest neighbours in the cluster);
* ``probcover``: ProbCover (Yehuda et al., NeurIPS 2022): balls of radius delta around each item, delta the
  largest radius at which 95 % of the balls stay inside one k-means cluster (the paper's purity rule); greedy
  max coverage of the items not yet covered;
* ``coreset``: k-centre greedy (Sener & Savarese, ICLR 2018): the item farthest from everything labelled or picked.

With a model (``probs``: (N, C) class probabilities, e.g. a probe fitted on the labelled items):

* ``entropy`` / ``margin``: the least confident items (highest predictive entropy / smallest top-2 margin);
* ``badge``: BADGE (Ash et al., ICLR 2020): k-means++ seeding on the gradient embeddings
  ``(p - onehot(argmax p)) x embedding``, uncertain and diverse at once.

"Revisiting Active Learning in the Era of Vision Foundation Models" (Gupte et al., TMLR 2024) compares these on
foundation-model embeddings; at budgets of a few labels per class the typicality / coverage ones lead.
Clustering, nearest neighbours and k-means++ are scikit-learn's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

MAX_CLUSTERS = 500  # TypiClust's cap on k-means clusters (the paper's)
TYPICALITY_NEIGHBOURS = 20
PURITY = 0.95  # ProbCover's cluster purity for choosing delta


def normalise(features) -> np.ndarray:
    """Float64 rows minus the pool's mean, scaled to unit length: every strategy measures angles seen from the
    pool's centre. Without the centring, the embeddings of a random or weakly trained encoder all point one
    way (PneumoniaMNIST with a random ViT-Tiny: median nearest-neighbour cosine distance 0.009), and
    distances say little about content."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(1))
        raise ValueError(f"embeddings of {len(bad)} item(s) are not finite, e.g. position {bad[0]}")
    x = x - x.mean(0, keepdims=True)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _kmeans(x: np.ndarray, k: int, seed: int):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)


def random_pick(x, pool, budget, labelled, seed, probs=None):
    return np.random.default_rng(seed).choice(pool, budget, replace=False).tolist()


def kmeans_pick(x, pool, budget, labelled, seed, probs=None):
    km = _kmeans(x[pool], budget, seed)
    d = km.transform(x[pool])  # (P, budget) distances to the centres
    picks: list[int] = []
    for c in np.argsort(np.bincount(km.labels_, minlength=budget))[::-1]:  # largest cluster first
        for i in np.argsort(d[:, c]):
            if pool[i] not in picks:
                picks.append(int(pool[i]))
                break
    return picks


def typicality(x: np.ndarray, k: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """1 / mean distance to the ``k`` nearest other items (TypiClust's density estimate)."""
    if len(x) == 1:
        return np.ones(1)
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(1) + 1e-8)


def typiclust_pick(x, pool, budget, labelled, seed, probs=None):
    k = min(len(labelled) + budget, MAX_CLUSTERS, len(x))
    clusters = _kmeans(x, k, seed).labels_
    size = np.bincount(clusters, minlength=k)
    taken = np.bincount(clusters[list(labelled)], minlength=k) if len(labelled) else np.zeros(k, int)
    free = set(pool.tolist())
    picks: list[int] = []
    while len(picks) < budget:
        open_ = [c for c in range(k) if any(int(i) in free for i in np.flatnonzero(clusters == c))]
        c = min(open_, key=lambda c: (taken[c], -size[c], c))
        members = np.flatnonzero(clusters == c)
        candidates = np.array([i for i in members if int(i) in free])
        typ = typicality(x[members])[np.searchsorted(members, candidates)]
        best = int(candidates[np.argmax(typ)])
        picks.append(best)
        free.discard(best)
        taken[c] += 1
    return picks


def purity_radius(x: np.ndarray, n_clusters: int, seed: int, purity: float = PURITY) -> float:
    """ProbCover's delta: the largest cosine-ball radius (euclidean on unit vectors) at which ``purity`` of
    the balls hold items of their centre's k-means cluster only."""
    from sklearn.neighbors import NearestNeighbors

    clusters = _kmeans(x, max(2, min(n_clusters, len(x) - 1)), seed).labels_
    k = min(len(x) - 1, 50)
    dist, nbr = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    # the distance to each item's nearest neighbour of another cluster (inf when none among its k nearest)
    other = clusters[nbr] != clusters[:, None]
    first_other = np.where(other.any(1), dist[np.arange(len(x)), other.argmax(1)], np.inf)
    # a ball of radius r is pure when r < first_other: the largest r with purity share of such balls
    finite = np.sort(first_other)
    r = finite[int(np.floor((1 - purity) * len(x)))]
    return float(min(r, dist[:, -1].max()) * (1 - 1e-6))


def probcover_pick(x, pool, budget, labelled, seed, probs=None, delta: float | None = None, n_classes: int = 0):
    from sklearn.neighbors import radius_neighbors_graph

    delta = delta if delta is not None else purity_radius(x, n_classes or budget, seed)
    graph = radius_neighbors_graph(x, delta, mode="connectivity", include_self=True).tocsr()
    covered = np.zeros(len(x), bool)
    for i in labelled:
        covered[graph.indices[graph.indptr[i]:graph.indptr[i + 1]]] = True
    free = np.zeros(len(x), bool)
    free[pool] = True
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    while len(picks) < budget:
        gain = np.asarray(graph[:, ~covered].sum(1)).ravel() if (~covered).any() else np.zeros(len(x))
        gain[~free] = -1
        if gain.max() <= 0:  # everything is covered: the rest at random, as the paper does
            rest = np.flatnonzero(free)
            picks += rng.choice(rest, budget - len(picks), replace=False).tolist()
            break
        best = int(np.argmax(gain))
        picks.append(best)
        free[best] = False
        covered[graph.indices[graph.indptr[best]:graph.indptr[best + 1]]] = True
    return [int(i) for i in picks]


def coreset_pick(x, pool, budget, labelled, seed, probs=None):
    centres = list(labelled) or [int(np.random.default_rng(seed).choice(pool))]
    picks = [] if labelled else [centres[0]]
    nearest = np.full(len(x), np.inf)
    for c in centres:
        nearest = np.minimum(nearest, np.linalg.norm(x - x[c], axis=1))
    free = np.zeros(len(x), bool)
    free[pool] = True
    free[picks] = False
    while len(picks) < budget:
        best = int(np.argmax(np.where(free, nearest, -1.0)))
        picks.append(best)
        free[best] = False
        nearest = np.minimum(nearest, np.linalg.norm(x - x[best], axis=1))
    return picks


def _need(probs, name):
    if probs is None:
        raise ValueError(f"strategy {name!r} needs a model's class probabilities: give labelled items with labels "
                         "(--labelled) so a probe can be fitted, or use a cold-start strategy")
    return np.asarray(probs, dtype=np.float64)


def entropy_pick(x, pool, budget, labelled, seed, probs=None):
    p = _need(probs, "entropy")[pool]
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return [int(pool[i]) for i in np.argsort(-h, kind="stable")[:budget]]


def margin_pick(x, pool, budget, labelled, seed, probs=None):
    p = np.sort(_need(probs, "margin")[pool], axis=1)
    margin = p[:, -1] - p[:, -2]
    return [int(pool[i]) for i in np.argsort(margin, kind="stable")[:budget]]


def badge_pick(x, pool, budget, labelled, seed, probs=None):
    from sklearn.cluster import kmeans_plusplus

    p = _need(probs, "badge")[pool]
    g = p.copy()
    g[np.arange(len(p)), p.argmax(1)] -= 1.0
    grad = (g[:, :, None] * x[pool][:, None, :]).reshape(len(pool), -1)
    _, idx = kmeans_plusplus(grad, budget, random_state=seed)
    return [int(pool[i]) for i in idx]


Strategy = Callable[..., list]
STRATEGIES: dict[str, Strategy] = {
    "random": random_pick, "kmeans": kmeans_pick, "typiclust": typiclust_pick, "probcover": probcover_pick,
    "coreset": coreset_pick, "entropy": entropy_pick, "margin": margin_pick, "badge": badge_pick,
}
NEEDS_MODEL = ("entropy", "margin", "badge")


def select(strategy: str, features, budget: int, labelled: Sequence[int] = (), seed: int = 0,
           probs=None, n_classes: int | None = None) -> list[int]:
    """``budget`` positions of ``features`` to label next by ``strategy`` (a name of :data:`STRATEGIES`), none
    of ``labelled``; deterministic per ``seed``. ``probs``: (N, C) class probabilities for the strategies that
    need a model (:data:`NEEDS_MODEL`); ``n_classes``: the number of classes when known (ProbCover's radius
    is chosen from that many clusters; otherwise from ``budget``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; strategies: {', '.join(STRATEGIES)}")
    x = normalise(features)
    labelled = sorted({int(i) for i in labelled})
    if any(i < 0 or i >= len(x) for i in labelled):
        raise ValueError(f"labelled positions must lie in 0..{len(x) - 1}")
    pool = np.setdiff1d(np.arange(len(x)), labelled)
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if len(pool) == 0:
        raise ValueError("the pool is empty: every item is already labelled")
    if budget > len(pool):
        raise ValueError(f"budget {budget} is larger than the unlabelled pool ({len(pool)} item(s))")
    if probs is not None and len(probs) != len(x):
        raise ValueError(f"probs has {len(probs)} rows for {len(x)} embeddings")
    kwargs = {"n_classes": n_classes or 0} if strategy == "probcover" else {}
    picks = STRATEGIES[strategy](x, pool, budget, labelled, seed, probs=probs, **kwargs)
    assert len(picks) == budget and len(set(picks)) == budget and not set(picks) & set(labelled), strategy
    return [int(i) for i in picks]
