"""Representation analyses and figures (matplotlib, Agg canvas; no global backend change).

- :func:`robustness_grid`: modality robustness — LP trained on 2D / 3D / ALL, macro AUROC on
  every test set (the paper's Table 3 lower half).
- :func:`pca_probe` / :func:`pca_analysis`: logistic regression on PCA-projected features, the
  PCA fitted on 2D-only, 3D-only or all training features ("2D-fit", "3D-fit", "joint-fit");
  reports test AUROCs and ``|coef|`` per PC for each finding (which PCs carry each finding).
- :func:`pca_feature_map` / :func:`save_feature_map_figure`: DINO-style maps — the first three
  PCs of one image's patch tokens as RGB.
- :func:`plot_loss_curve`: loss / pred_loss / sigreg_loss against step from ``metrics.jsonl``.

    python -m mmv_jax.eval.analysis --embeddings E.npz --out DIR [--metrics W/metrics.jsonl]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from mmv_jax.eval.io import FINDINGS, load_embeddings
from mmv_jax.eval.metrics import nan_to_none
from mmv_jax.eval.probe import (ABBREV, C_GRID, LP_DATA, _lower, evaluate_probe, fit_probe, fmt,
                                run_probe, select_rows)

__all__ = ["robustness_grid", "robustness_markdown", "plot_robustness_grid", "pca_probe",
           "pca_analysis", "plot_pca_coefficients", "pca_feature_map",
           "save_feature_map_figure", "plot_loss_curve", "main"]


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png):
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return str(out_png)


# --- modality robustness ---------------------------------------------------------------------

def robustness_grid(data, *, lp_datas=("2D", "3D", "ALL"), policy="ignore", n_boot=200,
                    seed=0, c_grid=C_GRID) -> dict:
    """``{lp_data: run_probe result}`` for each LP training set that has training rows."""
    grid = {}
    mods = set(_lower(data["modality"]).tolist())
    for lp in lp_datas:
        if not set(LP_DATA[lp]) & mods:
            continue
        grid[lp] = run_probe(data, lp_data=lp, policy=policy, n_boot=n_boot, seed=seed,
                             c_grid=c_grid)
    return grid


def _test_sets(grid):
    return sorted({t for res in grid.values() for t in res["test_sets"]})


def robustness_markdown(grid) -> str:
    tests = _test_sets(grid)
    lines = ["| LP data | " + " | ".join(tests) + " |", "|---|" + "---:|" * len(tests)]
    for lp, res in grid.items():
        cells = []
        for t in tests:
            m = res["test_sets"].get(t, {}).get("macro", {})
            c = fmt(m.get("auroc"))
            if c != "n/a" and fmt(m.get("ci_low")) != "n/a":
                c += f" [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]"
            cells.append(c)
        lines.append(f"| {lp} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_robustness_grid(grid, out_png) -> str:
    tests = _test_sets(grid)
    lps = list(grid)
    m = np.array([[grid[lp]["test_sets"].get(t, {}).get("macro", {}).get("auroc", np.nan)
                   for t in tests] for lp in lps], float)
    fig = _figure(1.6 + 1.3 * len(tests), 1.2 + 0.6 * len(lps))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, vmin=0.4, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(tests)), tests, rotation=30, ha="right")
    ax.set_yticks(range(len(lps)), [f"LP {lp}" for lp in lps])
    for i in range(len(lps)):
        for j in range(len(tests)):
            ax.text(j, i, fmt(m[i, j], 2), ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax, label="macro AUROC")
    return _save(fig, out_png)


# --- logistic regression on PCA-projected features --------------------------------------------

def pca_probe(data, *, fit_on="ALL", n_components=16, lp_data="ALL", policy="ignore",
              n_boot=0, seed=0, c_grid=C_GRID) -> dict:
    """PCA fitted on the training rows of modality ``fit_on`` ("2D"/"3D"/"ALL"), applied to all
    rows; a logistic-regression probe per finding on the first ``n_components`` PCs (training
    rows of ``lp_data``); returns explained variance, ``abs_coef [L, k]`` (|coef| per PC on
    standardised PCs, NaN row for a finding without a probe), the top PCs per finding, and the
    test-set AUROCs."""
    from sklearn.decomposition import PCA
    x = np.asarray(data["embeddings"], np.float64)
    if fit_on not in LP_DATA:
        raise ValueError(f"fit_on must be one of {list(LP_DATA)}, got {fit_on!r}")
    fit_rows = np.flatnonzero((_lower(data["split"]) == "train")
                              & np.isin(_lower(data["modality"]), LP_DATA[fit_on]))
    if fit_rows.size == 0:
        raise ValueError(f"no training rows to fit the {fit_on} PCA on")
    k = int(min(n_components, fit_rows.size, x.shape[1]))
    pca = PCA(n_components=k, random_state=seed).fit(x[fit_rows])
    proj = dict(data, embeddings=pca.transform(x).astype(np.float32))
    train, val, _ = select_rows(proj, lp_data=lp_data, seed=seed)
    probe = fit_probe(proj["embeddings"][train], proj["labels"][train],
                      proj["embeddings"][val], proj["labels"][val], policy=policy,
                      c_grid=c_grid, seed=seed)
    coef = np.full((len(FINDINGS), k), np.nan)
    for i, m in enumerate(probe.models):
        if m is not None:
            coef[i] = np.abs(m.coef_[0])
    top = {f: ([int(j) for j in np.argsort(-coef[i])[:3]] if not np.isnan(coef[i]).any()
               else []) for i, f in enumerate(FINDINGS)}
    tests = evaluate_probe(probe, proj, n_boot=n_boot, seed=seed)
    return {"fit_on": fit_on, "n_components": k, "n_fit": int(fit_rows.size),
            "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
            "abs_coef": coef.tolist(), "top_pcs": top, "test_sets": tests}


PCA_FITS = {"2D-fit": "2D", "3D-fit": "3D", "joint-fit": "ALL"}


def pca_analysis(data, *, n_components=16, **kw) -> dict:
    """:func:`pca_probe` for the 2D-fit, 3D-fit and joint-fit PCAs (those with training rows)."""
    mods = set(_lower(data["modality"]).tolist())
    return {name: pca_probe(data, fit_on=on, n_components=n_components, **kw)
            for name, on in PCA_FITS.items() if set(LP_DATA[on]) & mods}


def plot_pca_coefficients(analysis, out_png) -> str:
    """One heatmap per PCA fit: |coef| (findings x PCs), each finding's row divided by its
    maximum (C differs per finding, so raw magnitudes are not comparable across rows)."""
    fig = _figure(4.5 * len(analysis), 3.0)
    for i, (name, a) in enumerate(analysis.items()):
        ax = fig.add_subplot(1, len(analysis), i + 1)
        c = np.array(a["abs_coef"], float)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = c / np.nanmax(np.where(np.isnan(c), 0.0, c), axis=1, keepdims=True)
        im = ax.imshow(c, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_yticks(range(len(ABBREV)), ABBREV)
        ax.set_xlabel("principal component")
        ax.set_title(f"{name}: |coef| / row max")
        fig.colorbar(im, ax=ax)
    return _save(fig, out_png)


# --- DINO-style PCA feature maps ----------------------------------------------------------------

def pca_feature_map(patch_tokens, grid, slice_index=None):
    """``patch_tokens [n, d]`` of one image in patch order (z slowest), ``grid (gz, gy, gx)`` ->
    RGB ``[gy, gx, 3]`` float32 in [0, 1]: the first three PCs of the tokens (PCA over all the
    image's tokens), each min-max scaled over the whole image; for 3D (gz > 1) the depth slice
    ``slice_index`` (default the middle one, ``gz // 2``). PC signs are fixed so that each
    component's largest-magnitude loading is positive (deterministic output)."""
    gz, gy, gx = (int(g) for g in grid)
    t = np.asarray(patch_tokens, np.float64)
    if t.ndim != 2 or t.shape[0] != gz * gy * gx:
        raise ValueError(f"patch_tokens must be [gz*gy*gx={gz * gy * gx}, d], got {t.shape}")
    tc = t - t.mean(0)
    _, _, vt = np.linalg.svd(tc, full_matrices=False)
    vt = vt[:3]
    vt = vt * np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(1)])[:, None]
    pcs = np.zeros((t.shape[0], 3))
    pcs[:, :vt.shape[0]] = tc @ vt.T
    lo, hi = pcs.min(0), pcs.max(0)
    rgb = (pcs - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    z = gz // 2 if slice_index is None else int(slice_index)
    return rgb.reshape(gz, gy, gx, 3)[z].astype(np.float32)


def save_feature_map_figure(image, patch_tokens, grid, out_png, title=None) -> str:
    """PNG of the input (``[H, W]`` or ``[Z, H, W]``, middle slice for 3D) beside its PCA map."""
    img = np.asarray(image, np.float32)
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    rgb = pca_feature_map(patch_tokens, grid)
    fig = _figure(8, 4)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.imshow(img, cmap="gray")
    a.set_title("input" + ("" if np.asarray(image).ndim == 2 else " (mid slice)"))
    b.imshow(rgb, interpolation="nearest", extent=(0, img.shape[1], img.shape[0], 0))
    b.set_title("PCA of patch features (PC1-3 = RGB)")
    for ax in (a, b):
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


# --- training curves --------------------------------------------------------------------------------

LOSS_KEYS = ("loss", "pred_loss", "sigreg_loss")


def plot_loss_curve(metrics_jsonl_path, out_png) -> str:
    """loss, pred_loss and sigreg_loss against step, one panel each (malformed lines skipped)."""
    series = {k: ([], []) for k in LOSS_KEYS}
    with open(metrics_jsonl_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            for k in LOSS_KEYS:
                v = rec.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    series[k][0].append(rec["step"])
                    series[k][1].append(v)
    if not any(s[0] for s in series.values()):
        raise ValueError(f"{metrics_jsonl_path}: no step with {', '.join(LOSS_KEYS)}")
    fig = _figure(12, 3.2)
    for i, k in enumerate(LOSS_KEYS):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(*series[k], lw=1)
        ax.set_title(k)
        ax.set_xlabel("step")
        if series[k][1] and min(series[k][1]) > 0:
            ax.set_yscale("log")
    return _save(fig, out_png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mmv-analysis", description="robustness grid, PCA probes")
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", default=None, help="metrics.jsonl for the loss curve")
    ap.add_argument("--n-components", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        data = load_embeddings(args.embeddings)
        grid = robustness_grid(data, n_boot=args.bootstrap, seed=args.seed)
        pcs = pca_analysis(data, n_components=args.n_components, seed=args.seed)
    except ValueError as e:
        print(f"mmv-analysis: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "robustness.json"), "w") as f:
        json.dump(nan_to_none(grid), f, indent=2)
    md = robustness_markdown(grid)
    with open(os.path.join(args.out, "robustness.md"), "w") as f:
        f.write(md)
    plot_robustness_grid(grid, os.path.join(args.out, "robustness.png"))
    with open(os.path.join(args.out, "pca_probe.json"), "w") as f:
        json.dump(nan_to_none(pcs), f, indent=2)
    plot_pca_coefficients(pcs, os.path.join(args.out, "pca_coef.png"))
    if args.metrics:
        plot_loss_curve(args.metrics, os.path.join(args.out, "loss_curve.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
