"""AUROC / macro AUROC against scikit-learn; bootstrap CIs (deterministic, cover the estimate,
resample == weighted statistic); undefined labels."""

import json
import math

import numpy as np
from sklearn.metrics import roc_auc_score

from mmv_jax.eval.metrics import auroc, bootstrap_auroc, macro_auroc, nan_to_none, weighted_auroc


def data(seed=0, n=300, L=5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, L)) < 0.3).astype(np.float64)
    s = np.round(y * 0.8 + rng.normal(size=(n, L)), 1)  # rounding -> many ties
    y[rng.random((n, L)) < 0.1] = -1
    y[rng.random((n, L)) < 0.1] = np.nan
    return y, s


def test_auroc_equals_sklearn_with_ties():
    y, s = data()
    for k in range(5):
        m = (y[:, k] == 0) | (y[:, k] == 1)
        assert math.isclose(auroc(y[m, k], s[m, k]), roc_auc_score(y[m, k], s[m, k]), rel_tol=1e-12)
    per, macro = macro_auroc(y, s)
    want = [roc_auc_score(y[(y[:, k] >= 0), k], s[(y[:, k] >= 0), k]) for k in range(5)]
    np.testing.assert_allclose(per, want, rtol=1e-12)
    assert math.isclose(macro, np.mean(want), rel_tol=1e-12)


def test_weighted_auroc_equals_explicit_resample():
    y, s = data(1)
    m = y[:, 0] >= 0
    yk, sk = y[m, 0], s[m, 0]
    rng = np.random.default_rng(5)
    idx = rng.integers(0, yk.size, size=(3, yk.size))
    w = np.stack([np.bincount(i, minlength=yk.size) for i in idx])
    got = weighted_auroc(yk, sk, w)
    want = [roc_auc_score(yk[i], sk[i]) for i in idx]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bootstrap_deterministic_and_covers_estimate():
    y, s = data(2)
    a = bootstrap_auroc(y, s, n_boot=300, seed=3)
    b = bootstrap_auroc(y, s, n_boot=300, seed=3)
    c = bootstrap_auroc(y, s, n_boot=300, seed=4)
    assert a == b
    assert a["macro"]["ci_low"] != c["macro"]["ci_low"]
    for r in a["per_label"] + [a["macro"]]:
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"]
        assert r["ci_high"] - r["ci_low"] < 0.3
    assert a["macro"]["auroc"] == macro_auroc(y, s)[1]
    # default 1000 resamples runs and is deterministic too
    assert bootstrap_auroc(y, s, seed=0) == bootstrap_auroc(y, s, seed=0)


def test_single_class_label_is_undefined():
    y, s = data(3)
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)  # only negatives (and missing)
    per, macro = macro_auroc(y, s)
    assert math.isnan(per[1])
    assert math.isclose(macro, np.nanmean(np.delete(per, 1)))
    b = bootstrap_auroc(y, s, n_boot=50, seed=0)
    assert math.isnan(b["per_label"][1]["auroc"]) and math.isnan(b["per_label"][1]["ci_low"])
    assert b["per_label"][1]["n_pos"] == 0
    js = json.loads(json.dumps(nan_to_none(b)))
    assert js["per_label"][1]["auroc"] is None and js["macro"]["auroc"] is not None
    assert math.isnan(auroc(np.ones(4), np.arange(4.0)))
    assert math.isnan(auroc(np.zeros(0), np.zeros(0)))
