"""AUROC, macro AUROC and bootstrap confidence intervals (numpy only).

AUROC is the Mann-Whitney statistic with ties counted one half, which equals
``sklearn.metrics.roc_auc_score``. A label whose evaluated items hold only one class has an
undefined AUROC: NaN here, ``None`` in JSON, "n/a" in Markdown — never 0.5.

The bootstrap resamples *images* (rows) with replacement, jointly for all labels; every resample
is a vector of multiplicities, and each label's AUROC is the multiplicity-weighted
Mann-Whitney statistic over that label's evaluated rows (its rows with a 0/1 label). In each
resample the macro AUROC is the mean of the per-label AUROCs defined in it. The CI is the
percentile interval of the resamples where the value is defined.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["auroc", "weighted_auroc", "macro_auroc", "bootstrap_auroc", "nan_to_none"]


def _sorted_groups(y, score):
    """Sort by score; return (order, group start offsets) of tied-score groups."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def weighted_auroc(y, score, weights):
    """AUROC of binary ``y [n]`` (0/1) for ``score [n]`` with row multiplicities
    ``weights [..., n]`` -> ``[...]`` (NaN where one class has zero weight)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    w = np.asarray(weights, np.float64)
    if y.size == 0:
        return np.full(w.shape[:-1], np.nan)
    order, starts = _sorted_groups(y, score)
    w = w[..., order]
    ys = y[order]
    wp = np.add.reduceat(np.where(ys, w, 0.0), starts, axis=-1)  # [..., G]
    wn = np.add.reduceat(np.where(ys, 0.0, w), starts, axis=-1)
    below = np.cumsum(wn, axis=-1) - wn  # negatives strictly lower
    num = (wp * (below + 0.5 * wn)).sum(-1)
    den = wp.sum(-1) * wn.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auroc(y, score) -> float:
    """AUROC of binary labels ``y`` (0/1) for ``score``; NaN when ``y`` holds one class."""
    y = np.asarray(y)
    return float(weighted_auroc(y, score, np.ones(y.shape[0])))


def _valid(labels):
    labels = np.asarray(labels, np.float64)
    return (labels == 0) | (labels == 1)


def macro_auroc(labels, scores):
    """labels ``[n, L]`` (1/0; anything else — -1, NaN — is left out per label), scores
    ``[n, L]`` -> ``(per_label [L] with NaN for undefined, macro)``; macro is the mean of the
    defined per-label values (NaN if none)."""
    labels = np.asarray(labels, np.float64)
    scores = np.asarray(scores, np.float64)
    ok = _valid(labels)
    per = np.array(
        [auroc(labels[ok[:, k], k], scores[ok[:, k], k]) for k in range(labels.shape[1])]
    )
    return per, _nanmean(per)


def _nanmean(a, axis=None):
    a = np.asarray(a, np.float64)
    cnt = np.sum(~np.isnan(a), axis=axis)
    tot = np.nansum(a, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def bootstrap_auroc(
    labels, scores, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, chunk: int = 100
):
    """Per-label and macro AUROC with percentile bootstrap CIs over rows (images).

    Returns a dict: ``per_label`` = list of ``{"auroc", "ci_low", "ci_high", "n_pos", "n_neg"}``
    (floats, NaN where undefined) and ``macro`` = ``{"auroc", "ci_low", "ci_high"}``.
    Deterministic for a seed.
    """
    labels = np.asarray(labels, np.float64)
    scores = np.asarray(scores, np.float64)
    n, L = labels.shape
    ok = _valid(labels)
    per, macro = macro_auroc(labels, scores)
    boot = np.full((n_boot, L), np.nan)
    rng = np.random.default_rng(seed)
    for b0 in range(0, n_boot, chunk):
        b1 = min(n_boot, b0 + chunk)
        idx = rng.integers(0, n, size=(b1 - b0, n))
        flat = (idx + n * np.arange(b1 - b0)[:, None]).ravel()
        counts = np.bincount(flat, minlength=(b1 - b0) * n).reshape(b1 - b0, n).astype(float)
        for k in range(L):
            m = ok[:, k]
            if math.isnan(per[k]):
                continue
            boot[b0:b1, k] = weighted_auroc(labels[m, k], scores[m, k], counts[:, m])
    boot_macro = _nanmean(boot, axis=1)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def ci(v):
        v = v[~np.isnan(v)]
        return (np.nan, np.nan) if v.size == 0 else tuple(float(x) for x in np.percentile(v, q))

    out = {"per_label": [], "macro": {}}
    for k in range(L):
        lo, hi = ci(boot[:, k])
        yk = labels[ok[:, k], k]
        out["per_label"].append(
            {
                "auroc": float(per[k]),
                "ci_low": lo,
                "ci_high": hi,
                "n_pos": int((yk == 1).sum()),
                "n_neg": int((yk == 0).sum()),
            }
        )
    lo, hi = ci(boot_macro)
    out["macro"] = {"auroc": float(macro), "ci_low": lo, "ci_high": hi}
    return out


def nan_to_none(obj):
    """Recursively replace float NaN with None (for JSON)."""
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
