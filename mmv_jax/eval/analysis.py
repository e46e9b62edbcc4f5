"""Representation analyses and figures (``mmv-analysis``; matplotlib, Agg canvas).

- :func:`robustness_grid`: modality robustness — LP trained on 2D / 3D / ALL, macro AUROC on
  every test set (the paper's Table 3 lower half).
- :func:`shared_pca_probe` (Fig. 2a): one PCA basis fitted on ALL training embeddings; logistic
  regression probes in that basis trained on the 2D, 3D or ALL training rows ("2D-fitted",
  "3D-fitted", "joint-fitted"); per-modality test AUROC (cardiomegaly first) and the top
  components each probe uses — e.g. whether the 2D-fitted probe can predict cardiomegaly in CT.
- :func:`pca_probe` / :func:`pca_analysis` (an extra): the PCA itself fitted on 2D-only,
  3D-only or all training features, the probe always on ALL.
- DINO-style PCA maps of patch features: :mod:`mmv_jax.eval.feature_maps`.
- :func:`plot_loss_curve`: loss / pred_loss / sigreg_loss against step from ``metrics.jsonl``.

    mmv-analysis --embeddings E.npz --out DIR [--metrics RUN/metrics.jsonl]
    mmv-analysis --checkpoint RUN --manifest M.jsonl --out DIR [--embeddings E.npz] [--maps 3]

With ``--checkpoint`` (a run folder of ``mmv-train``) the embeddings are computed when not given
(``DIR/embeddings.npz``), the loss curve is read from ``RUN/metrics.jsonl``, and ``--maps`` test
images per modality get PCA maps, one PCA across all of them (``DIR/pca_maps.png``).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from mmv_jax import cli
from mmv_jax.eval.feature_maps import (
    figure as _figure,  # noqa: F401
    pca_feature_map,
    save as _save,
    save_feature_map_figure,
)
from mmv_jax.eval.io import findings_of, load_embeddings
from mmv_jax.eval.metrics import nan_to_none
from mmv_jax.eval.probe import (
    C_GRID,
    LP_DATA,
    _lower,
    abbrev,
    evaluate_probe,
    fit_probe,
    fmt,
    run_probe,
    select_rows,
)

__all__ = [
    "robustness_grid",
    "robustness_markdown",
    "plot_robustness_grid",
    "shared_pca_probe",
    "shared_pca_markdown",
    "plot_shared_pca",
    "pca_probe",
    "pca_analysis",
    "plot_pca_coefficients",
    "pca_feature_map",
    "save_feature_map_figure",
    "plot_loss_curve",
    "main",
]


# --- modality robustness ---------------------------------------------------------------------


def robustness_grid(
    data, *, lp_datas=("2D", "3D", "ALL"), policy="ignore", n_boot=200, seed=0, c_grid=C_GRID
) -> dict:
    """``{lp_data: run_probe result}`` for each LP training set that has training rows."""
    grid = {}
    mods = set(_lower(data["modality"]).tolist())
    for lp in lp_datas:
        if not set(LP_DATA[lp]) & mods:
            continue
        grid[lp] = run_probe(
            data, lp_data=lp, policy=policy, n_boot=n_boot, seed=seed, c_grid=c_grid
        )
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
    m = np.array(
        [
            [grid[lp]["test_sets"].get(t, {}).get("macro", {}).get("auroc", np.nan) for t in tests]
            for lp in lps
        ],
        float,
    )
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

# --- Fig. 2a: one PCA basis, probes trained on 2D / 3D / ALL rows ------------------------------

PROBE_FITS = {"2D-fitted": "2D", "3D-fitted": "3D", "joint-fitted": "ALL"}
MODALITY_NAMES = {"cxr": "2D", "ct": "3D"}


def _fig_findings(findings) -> tuple:
    """The findings with cardiomegaly (the paper's cross-modal example) first when present."""
    return tuple(sorted(findings, key=lambda f: f != "cardiomegaly"))


def _abs_coef(probe, k):
    """``|coef|`` per finding (rows in the file's findings order) x component; NaN row: no probe."""
    coef = np.full((len(probe.models), k), np.nan)
    for i, m in enumerate(probe.models):
        if m is not None:
            coef[i] = np.abs(m.coef_[0])
    return coef


def _top(coef, findings, n=3):
    return {
        f: ([int(j) for j in np.argsort(-coef[i])[:n]] if not np.isnan(coef[i]).any() else [])
        for i, f in enumerate(findings)
    }


def _pca(data, fit_on: str, n_components: int, seed: int):
    """PCA fitted on the training rows of modality ``fit_on`` ("2D"/"3D"/"ALL"), applied to every
    row: (data with the projected embeddings, the fitted PCA, the number of rows it was fitted on)."""
    from sklearn.decomposition import PCA

    if fit_on not in LP_DATA:
        raise ValueError(f"fit_on must be one of {list(LP_DATA)}, got {fit_on!r}")
    x = np.asarray(data["embeddings"], np.float64)
    fit_rows = np.flatnonzero(
        (_lower(data["split"]) == "train") & np.isin(_lower(data["modality"]), LP_DATA[fit_on])
    )
    if fit_rows.size == 0:
        raise ValueError(f"no training rows to fit the {fit_on} PCA on")
    k = int(min(n_components, fit_rows.size, x.shape[1]))
    pca = PCA(n_components=k, random_state=seed).fit(x[fit_rows])
    return dict(data, embeddings=pca.transform(x).astype(np.float32)), pca, int(fit_rows.size)


def _pc_probe(proj, lp_data: str, *, policy, c_grid, seed):
    """A probe per finding on the components of ``lp_data``'s training rows (C chosen on its
    validation rows): (probe, training row count, ``|coef|`` [L, k])."""
    train, val, _ = select_rows(proj, lp_data=lp_data, seed=seed)
    e, y = proj["embeddings"], proj["labels"]
    probe = fit_probe(e[train], y[train], e[val], y[val], policy=policy, c_grid=c_grid, seed=seed)
    return probe, int(train.size), _abs_coef(probe, e.shape[1])


def shared_pca_probe(
    data, *, n_components=16, policy="ignore", n_boot=0, seed=0, c_grid=C_GRID
) -> dict:
    """The paper's Fig. 2a analysis. One PCA basis, fitted on the ALL training rows (both
    modalities); probes on the first ``n_components`` components trained on the 2D, 3D and ALL
    training rows (those with rows). Returns ``{"n_components", "n_fit",
    "explained_variance_ratio", "findings" (cardiomegaly first), "probes": {"2D-fitted" |
    "3D-fitted" | "joint-fitted": {"lp_data", "abs_coef" [L, k] (rows: "coef_findings"), "top_pcs",
    "per_modality": {"2D" | "3D": {finding: auroc}}, "test_sets"}}}`` — per-modality AUROC pools
    every test row of that modality."""
    proj, pca, n_fit = _pca(data, "ALL", n_components, seed)
    by_modality = dict(
        proj, dataset=np.array([MODALITY_NAMES.get(m, m) for m in _lower(data["modality"])])
    )
    mods = set(_lower(data["modality"]).tolist())
    findings = findings_of(data)
    fig_findings = _fig_findings(findings)
    probes = {}
    for name, lp in PROBE_FITS.items():
        if not set(LP_DATA[lp]) & mods:
            continue
        probe, n_train, coef = _pc_probe(proj, lp, policy=policy, c_grid=c_grid, seed=seed)
        per_mod = evaluate_probe(probe, by_modality, n_boot=0, seed=seed)
        probes[name] = {
            "lp_data": lp,
            "n_train": n_train,
            "abs_coef": coef.tolist(),
            "top_pcs": {f: _top(coef, findings)[f] for f in fig_findings},
            "per_modality": {
                m: {f: r["per_label"][f]["auroc"] for f in fig_findings} for m, r in per_mod.items()
            },
            "test_sets": evaluate_probe(probe, proj, n_boot=n_boot, seed=seed),
        }
    return {
        "n_components": int(pca.n_components_),
        "n_fit": n_fit,
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        "findings": list(fig_findings),
        "coef_findings": list(findings),
        "probes": probes,
    }


def shared_pca_markdown(result) -> str:
    """Per probe: test AUROC on each modality (cardiomegaly first) and its top components."""
    mods = sorted({m for p in result["probes"].values() for m in p["per_modality"]})
    first = result["findings"][0]
    cols = [f"{m} {abbrev(f)}" for f in result["findings"] for m in mods]
    lines = [
        f"One PCA basis ({result['n_components']} components) fitted on all "
        f"{result['n_fit']} training embeddings; test AUROC per modality.",
        "",
        "| Probe | " + " | ".join(cols) + f" | top PCs ({abbrev(first)}) |",
        "|---|" + "---:|" * len(cols) + "---|",
    ]
    for name, p in result["probes"].items():
        cells = [fmt(p["per_modality"].get(m, {}).get(f)) for f in result["findings"] for m in mods]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + " | "
            + ", ".join(f"PC{j + 1}" for j in p["top_pcs"][first])
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_shared_pca(result, out_png) -> str:
    """Per probe: |coef| over the shared components (findings x PCs, cardiomegaly first row,
    each row divided by its maximum), titled with the cardiomegaly AUROC on each modality."""
    probes = result["probes"]
    order = [result["coef_findings"].index(f) for f in result["findings"]]
    names = [abbrev(f) for f in result["findings"]]
    fig = _figure(4.5 * len(probes), 3.2)
    for i, (name, p) in enumerate(probes.items()):
        ax = fig.add_subplot(1, len(probes), i + 1)
        c = np.array(p["abs_coef"], float)[order]
        with np.errstate(invalid="ignore", divide="ignore"):
            c = c / np.nanmax(np.where(np.isnan(c), 0.0, c), axis=1, keepdims=True)
        im = ax.imshow(c, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(c.shape[1]), [str(j + 1) for j in range(c.shape[1])], fontsize=6)
        ax.set_xlabel("shared principal component")
        card = ", ".join(
            f"{m} {fmt(v.get('cardiomegaly'), 2)}" for m, v in sorted(p["per_modality"].items())
        )
        ax.set_title(f"{name}\nCARD AUROC: {card}", fontsize=9)
        fig.colorbar(im, ax=ax)
    return _save(fig, out_png)


# --- extra: the PCA itself fitted per modality, the probe on ALL -----------------------------


def pca_probe(
    data,
    *,
    fit_on="ALL",
    n_components=16,
    lp_data="ALL",
    policy="ignore",
    n_boot=0,
    seed=0,
    c_grid=C_GRID,
) -> dict:
    """PCA fitted on the training rows of modality ``fit_on`` ("2D"/"3D"/"ALL"), applied to all
    rows; a logistic-regression probe per finding on the first ``n_components`` PCs (training
    rows of ``lp_data``); returns explained variance, ``abs_coef [L, k]`` (|coef| per PC on
    standardised PCs, NaN row for a finding without a probe), the top PCs per finding, and the
    test-set AUROCs."""
    proj, pca, n_fit = _pca(data, fit_on, n_components, seed)
    probe, _, coef = _pc_probe(proj, lp_data, policy=policy, c_grid=c_grid, seed=seed)
    findings = findings_of(data)
    top = _top(coef, findings)
    tests = evaluate_probe(probe, proj, n_boot=n_boot, seed=seed)
    return {
        "fit_on": fit_on,
        "n_components": int(pca.n_components_),
        "n_fit": n_fit,
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        "abs_coef": coef.tolist(),
        "findings": list(findings),
        "top_pcs": top,
        "test_sets": tests,
    }


PCA_FITS = {"2D-fit": "2D", "3D-fit": "3D", "joint-fit": "ALL"}


def pca_analysis(data, *, n_components=16, **kw) -> dict:
    """:func:`pca_probe` for the 2D-fit, 3D-fit and joint-fit PCAs (those with training rows)."""
    mods = set(_lower(data["modality"]).tolist())
    return {
        name: pca_probe(data, fit_on=on, n_components=n_components, **kw)
        for name, on in PCA_FITS.items()
        if set(LP_DATA[on]) & mods
    }


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
        ax.set_yticks(range(len(a["findings"])), [abbrev(f) for f in a["findings"]])
        ax.set_xlabel("principal component")
        ax.set_title(f"{name}: |coef| / row max")
        fig.colorbar(im, ax=ax)
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


def _write(out, name, obj=None, text=None):
    with open(os.path.join(out, name), "w") as f:
        if obj is not None:
            json.dump(nan_to_none(obj), f, indent=2)
        else:
            f.write(text)


def feature_map_figure(cfg, encoder, records, out_png, per_modality=3) -> str | None:
    """PCA maps of ``per_modality`` test images of each modality (test split first, else any),
    one PCA across all of them; ``None`` when there is no image."""
    from mmv_jax.eval.feature_maps import patch_tokens, save_feature_maps_figure

    chosen = []
    for mod in ("cxr", "ct"):
        pool = [r for r in records if r.modality == mod]
        pool = [r for r in pool if r.split == "test"] or pool
        chosen += pool[:per_modality]
    if not chosen:
        return None
    got = patch_tokens(cfg, encoder, chosen)
    return save_feature_maps_figure(
        [g[0] for g in got],
        [g[1] for g in got],
        [g[2] for g in got],
        out_png,
        titles=[f"{MODALITY_NAMES[r.modality]} test image {i + 1}" for i, r in enumerate(chosen)],
    )


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="mmv-analysis", description=__doc__.split("\n")[0])
    ap.add_argument("--embeddings", default=None, help="embedding .npz (mmv-embed)")
    ap.add_argument("--checkpoint", default=None, help="run folder (mmv-train): embeds and maps")
    ap.add_argument("--manifest", default=None, help="manifest to embed / map (with --checkpoint)")
    ap.add_argument("--config", default=None, help="config file (default: the run's config.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", default=None, help="metrics.jsonl for the loss curve")
    ap.add_argument("--maps", type=int, default=3, help="test images per modality in the PCA maps")
    ap.add_argument("--n-components", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    figures = []
    try:
        if args.checkpoint and not args.manifest:
            raise ValueError("--checkpoint needs --manifest (the images to embed and map)")
        if not (args.embeddings or args.checkpoint):
            raise ValueError("give --embeddings, or --checkpoint and --manifest")
        metrics = args.metrics
        if args.checkpoint:
            from mmv_jax.data.manifest import load_manifest
            from mmv_jax.eval import embed
            from mmv_jax.train import sharding as shd

            cfg = embed.load_run_config(args.checkpoint, args.config)
            records = load_manifest(args.manifest)
            mesh = shd.make_mesh((-1, 1, 1))
            encoder = embed.build_encoder(
                cfg, args.checkpoint, mesh, modalities={r.modality for r in records}
            )
            if not args.embeddings:
                args.embeddings = os.path.join(args.out, "embeddings.npz")
                embed.embed(cfg, records, encoder, args.embeddings, mesh)
            if args.maps > 0:
                fig = feature_map_figure(
                    cfg, encoder, records, os.path.join(args.out, "pca_maps.png"), args.maps
                )
                figures += [fig] if fig else []
            run_metrics = os.path.join(args.checkpoint, "metrics.jsonl")
            metrics = metrics or (run_metrics if os.path.exists(run_metrics) else None)
        data = load_embeddings(args.embeddings)
        grid = robustness_grid(data, n_boot=args.bootstrap, seed=args.seed)
        shared = shared_pca_probe(data, n_components=args.n_components, seed=args.seed)
        extra = pca_analysis(data, n_components=args.n_components, seed=args.seed)
    except ValueError as e:
        print(f"mmv-analysis: error: {e}", file=sys.stderr)
        return 2
    md = robustness_markdown(grid)
    _write(args.out, "robustness.json", grid)
    _write(args.out, "robustness.md", text=md)
    figures.append(plot_robustness_grid(grid, os.path.join(args.out, "robustness.png")))
    smd = shared_pca_markdown(shared)
    _write(args.out, "pca_shared.json", shared)
    _write(args.out, "pca_shared.md", text=smd)
    figures.append(plot_shared_pca(shared, os.path.join(args.out, "pca_shared.png")))
    _write(args.out, "pca_probe.json", extra)
    figures.append(plot_pca_coefficients(extra, os.path.join(args.out, "pca_coef.png")))
    if metrics:
        figures.append(plot_loss_curve(metrics, os.path.join(args.out, "loss_curve.png")))
    print(md)
    print(smd)
    print("figures: " + ", ".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
