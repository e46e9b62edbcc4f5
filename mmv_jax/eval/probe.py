"""Linear probing on frozen embeddings (``mmv-probe``).

One logistic-regression probe per finding (scikit-learn, L2 on the weights only: lbfgs leaves
the intercept unpenalised), on standardised features (mean/std of the probe's training rows).
The inverse regularisation ``C`` is chosen per finding on a validation split — rows whose split
is ``val``/``valid``/``validate``/``validation`` — or, when the file has none for the chosen
rows, on a seeded hold-out of 20% of the training rows, whole patients at a time (the ``group``
array of the embedding file; rows without one are their own group). The test split never
chooses anything. The final probe is the one fitted on the training rows with the chosen C.

Training rows: ``split == "train"`` with the modality given by ``lp_data`` ("2D" = cxr,
"3D" = ct, "ALL" = both), from every dataset, or only from ``train_dataset`` (domain
adaptation). The external test sets (CheXpert, RAD-ChestCT) never train the 2D/3D/ALL probes: a
file whose training rows hold one is refused. Domain adaptation on a dataset without a train
split (RAD-ChestCT: every volume is test data) splits its test rows by a seeded, patient-grouped
80/20 (:func:`adaptation_split`): the probe trains on the 80% and is tested on the 20%.

Labels (1 positive, 0 negative, -1 uncertain, NaN missing), per finding:
- training/validation, ``policy="ignore"`` (default): uncertain and missing rows are excluded;
  ``"zeros"``: uncertain -> 0; ``"ones"``: uncertain -> 1. Missing rows are always excluded.
- test: only rows labelled 0 or 1 are evaluated (uncertain and missing excluded), whatever
  the training policy.
A finding with a single class in its training rows gets no probe and is reported undefined.

Evaluation: per test set (rows with ``split == "test"``, grouped by ``dataset``), per-label AUROC
and macro AUROC (mean of the defined per-label values) with 95% percentile bootstrap CIs over
test images (:mod:`mmv_jax.eval.metrics`). Undefined values are ``null`` in JSON and "n/a"
in Markdown.

    mmv-probe --embeddings E.npz [--lp-data ALL] [--train-dataset NAME] [--policy ignore]
              [--out DIR] [--compare --stage 3] [--bootstrap 1000] [--seed 0]
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from mmv_jax import cli
from mmv_jax.eval.io import FINDINGS, findings_of, load_embeddings, save_embeddings  # noqa: F401
from mmv_jax.eval.metrics import auroc, bootstrap_auroc, nan_to_none
from mmv_jax.eval.reference import paper_test_set

ABBREV = ("ATEL", "CARD", "CONS", "LO", "EFF")  # reference_results.csv column names (FINDINGS)
VAL_SPLITS = ("val", "valid", "validate", "validation")
LP_DATA = {"2D": ("cxr",), "3D": ("ct",), "ALL": ("cxr", "ct")}
POLICIES = ("ignore", "zeros", "ones")
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

EXTERNAL_TEST_SETS = ("CheXpert", "RAD-ChestCT")  # the paper's external tests (reference names)

__all__ = [
    "FINDINGS",
    "ABBREV",
    "abbrev",
    "load_embeddings",
    "save_embeddings",
    "grouped_holdout",
    "adaptation_split",
    "select_rows",
    "probe_targets",
    "LinearProbe",
    "fit_probe",
    "evaluate_probe",
    "run_probe",
    "results_markdown",
    "main",
]


def _lower(a):
    return np.char.lower(np.asarray(a).astype(str))


def grouped_holdout(groups, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask ``[n]`` of a seeded hold-out of whole groups (patients): groups, in a
    seeded order, are held out until they hold ``fraction`` of the rows. No group is split."""
    groups = np.asarray(groups)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(uniq.size)
    held_sizes = np.cumsum(counts[order]) - counts[order]  # rows held before each group
    held = np.zeros(uniq.size, bool)
    held[order] = held_sizes < fraction * groups.size
    return held[inverse.ravel()]


def _groups(data: dict) -> np.ndarray:
    """Patient group per row: the file's ``group`` array, else every row its own group."""
    if "group" in data:
        return np.asarray(data["group"]).astype(str)
    return np.asarray(data["ids"]).astype(str)


def adaptation_split(
    data: dict, dataset: str, *, test_fraction: float = 0.2, seed: int = 0
) -> dict:
    """``data`` with ``dataset``'s test rows split for domain adaptation (Table 2): a seeded,
    patient-grouped ``1 - test_fraction`` of them become ``train``, the rest stay ``test``.
    A dataset with its own train rows is returned unchanged."""
    ds = _lower(data["dataset"]) == dataset.lower()
    split = _lower(data["split"])
    if (ds & (split == "train")).any():
        return data
    rows = np.flatnonzero(ds & (split == "test"))
    if rows.size == 0:
        return data
    test = grouped_holdout(_groups(data)[rows], test_fraction, seed)
    new = np.asarray(data["split"]).astype(str).astype(object)
    new[rows[~test]] = "train"
    return dict(data, split=new.astype(str))


def select_rows(
    data: dict,
    *,
    lp_data: str = "ALL",
    train_dataset: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
):
    """Indices ``(train, val, val_source)`` of the probe's training and validation rows;
    ``val_source`` is ``"split"`` or ``"holdout"`` (patient-grouped, see :func:`grouped_holdout`)."""
    if lp_data not in LP_DATA:
        raise ValueError(f"lp_data must be one of {list(LP_DATA)}, got {lp_data!r}")
    keep = np.isin(_lower(data["modality"]), LP_DATA[lp_data])
    if train_dataset is not None:
        ds = _lower(data["dataset"])
        if not (ds == train_dataset.lower()).any():
            raise ValueError(
                f"train dataset {train_dataset!r} not in the file "
                f"(datasets: {sorted(set(data['dataset'].tolist()))})"
            )
        keep &= ds == train_dataset.lower()
    split = _lower(data["split"])
    train = np.flatnonzero(keep & (split == "train"))
    val = np.flatnonzero(keep & np.isin(split, VAL_SPLITS))
    if train_dataset is None:
        used = np.asarray(data["dataset"])[np.concatenate([train, val])]
        external = sorted({d for d in used.tolist() if paper_test_set(d) in EXTERNAL_TEST_SETS})
        if external:
            raise ValueError(
                f"{', '.join(external)} rows are in split train/val, but "
                f"{', '.join(external)} is an external test set and must not train "
                f"the {lp_data} probe; rebuild its manifest with "
                "tools/build_manifest.py (every volume split test)"
            )
    if train.size == 0:
        raise ValueError(
            f"no training rows (split 'train', lp_data {lp_data}"
            f"{', dataset ' + train_dataset if train_dataset else ''})"
        )
    if val.size:
        return train, val, "split"
    if train.size < 2:
        return train, val, "holdout"
    held = grouped_holdout(_groups(data)[train], val_fraction, seed)
    if held.all():  # one patient only: hold out nothing rather than everything
        held[:] = False
    return train[~held], train[held], "holdout"


def probe_targets(labels, policy: str = "ignore"):
    """``labels [n]`` -> ``(y [n] int, mask [n] bool)`` under an uncertain-label policy."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    lab = np.asarray(labels, np.float64)
    y = lab.copy()
    if policy == "zeros":
        y[lab == -1] = 0
    elif policy == "ones":
        y[lab == -1] = 1
    mask = (y == 0) | (y == 1)
    return np.where(mask, y, 0).astype(np.int64), mask


@dataclass
class LinearProbe:
    """Standardisation + one logistic regression per finding (None = no probe)."""

    mean: np.ndarray
    scale: np.ndarray
    models: list = field(default_factory=list)
    C: list = field(default_factory=list)

    def transform(self, x):
        return (np.asarray(x, np.float64) - self.mean) / self.scale

    def decision(self, x):
        """Scores ``[n, len(models)]`` (log-odds); NaN columns for findings without a probe."""
        z = self.transform(x)
        out = np.full((z.shape[0], len(self.models)), np.nan)
        for k, m in enumerate(self.models):
            if m is not None:
                out[:, k] = m.decision_function(z)
        return out


def _fit_lr(x, y, C, seed):
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny/separable data
        m.fit(x, y)
    return m


def fit_probe(
    x_train,
    labels_train,
    x_val,
    labels_val,
    *,
    policy: str = "ignore",
    c_grid=C_GRID,
    seed: int = 0,
) -> LinearProbe:
    """Fits a :class:`LinearProbe`; ``labels_* [n, L]``. C per finding maximises validation
    AUROC (the first grid value on ties; C = 1 when the validation rows hold one class)."""
    x_train = np.asarray(x_train, np.float64)
    mean = x_train.mean(0)
    scale = x_train.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    probe = LinearProbe(mean, scale)
    zt, zv = probe.transform(x_train), probe.transform(x_val)
    for k in range(np.asarray(labels_train).shape[1]):
        yt, mt = probe_targets(np.asarray(labels_train)[:, k], policy)
        yv, mv = probe_targets(np.asarray(labels_val)[:, k], policy)
        if len(set(yt[mt].tolist())) < 2:
            probe.models.append(None)
            probe.C.append(None)
            continue
        val_ok = len(set(yv[mv].tolist())) == 2
        best, best_c, best_m = -np.inf, 1.0, None
        for c in c_grid if val_ok else (1.0,):
            m = _fit_lr(zt[mt], yt[mt], c, seed)
            score = auroc(yv[mv], m.decision_function(zv[mv])) if val_ok else 0.0
            if score > best:
                best, best_c, best_m = score, c, m
        probe.models.append(best_m)
        probe.C.append(float(best_c))
    return probe


def evaluate_probe(
    probe: LinearProbe, data: dict, *, datasets=None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Per test set (``split == "test"`` rows grouped by dataset): per-label and macro AUROC with
    bootstrap CIs. Returns ``{dataset: {"n", "modality", "per_label": {finding: {...}},
    "macro": {...}}}`` with NaN for undefined values."""
    split = _lower(data["split"])
    ds_all = np.asarray(data["dataset"]).astype(str)
    names = sorted(set(ds_all[split == "test"].tolist()))
    if datasets is not None:
        wanted = {d.lower() for d in datasets}
        names = [d for d in names if d.lower() in wanted]
    out = {}
    for name in names:
        idx = np.flatnonzero((split == "test") & (ds_all == name))
        scores = probe.decision(data["embeddings"][idx])
        labels = np.asarray(data["labels"][idx], np.float64).copy()
        labels[:, np.isnan(scores).any(0)] = np.nan  # no probe -> undefined
        scores = np.nan_to_num(scores)
        b = bootstrap_auroc(labels, scores, n_boot=n_boot, seed=seed)
        out[name] = {
            "n": int(idx.size),
            "modality": sorted(set(np.asarray(data["modality"])[idx].tolist())),
            "per_label": dict(zip(findings_of(data), b["per_label"])),
            "macro": b["macro"],
        }
    return out


def run_probe(
    data: dict,
    *,
    lp_data: str = "ALL",
    train_dataset: str | None = None,
    policy: str = "ignore",
    n_boot: int = 1000,
    seed: int = 0,
    c_grid=C_GRID,
    test_datasets=None,
) -> dict:
    """Select rows, fit, evaluate. With ``train_dataset`` only that dataset's test split is
    evaluated (unless ``test_datasets`` says otherwise). Returns a JSON-ready dict (NaN kept;
    use :func:`mmv_jax.eval.metrics.nan_to_none` before ``json.dump``)."""
    if train_dataset is not None:
        data = adaptation_split(data, train_dataset, seed=seed)
    train, val, val_source = select_rows(
        data, lp_data=lp_data, train_dataset=train_dataset, seed=seed
    )
    x, lab = data["embeddings"], data["labels"]
    probe = fit_probe(
        x[train], lab[train], x[val], lab[val], policy=policy, c_grid=c_grid, seed=seed
    )
    if test_datasets is None and train_dataset is not None:
        test_datasets = [train_dataset]
    tests = evaluate_probe(probe, data, datasets=test_datasets, n_boot=n_boot, seed=seed)
    return {
        "config": {
            "lp_data": lp_data,
            "train_dataset": train_dataset,
            "policy": policy,
            "n_boot": n_boot,
            "seed": seed,
            "n_train": int(train.size),
            "n_val": int(val.size),
            "val_source": val_source,
            "C": dict(zip(findings_of(data), probe.C)),
        },
        "findings": list(findings_of(data)),
        "test_sets": tests,
    }


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def abbrev(finding: str) -> str:
    """The paper's column name of one of its five findings; any other finding's own name."""
    return dict(zip(FINDINGS, ABBREV)).get(finding, finding)


def results_markdown(result: dict, digits: int = 3) -> str:
    cfg = result["config"]
    findings = result["findings"]
    train = f"{cfg['train_dataset']} train" if cfg.get("train_dataset") else cfg["lp_data"]
    lines = [
        f"LP data: {train} (policy {cfg['policy']}, {cfg['n_train']} train / "
        f"{cfg['n_val']} val rows [{cfg['val_source']}], {cfg['n_boot']} bootstrap "
        f"resamples, seed {cfg['seed']})",
        "",
        "| Test set | n | " + " | ".join(map(abbrev, findings)) + " | Macro | 95% CI |",
        "|---|---:|" + "---:|" * len(findings) + "---:|---|",
    ]
    for name, r in result["test_sets"].items():
        cells = [fmt(r["per_label"][f]["auroc"], digits) for f in findings]
        m = r["macro"]
        ci = (
            "n/a"
            if fmt(m["ci_low"]) == "n/a"
            else f"[{fmt(m['ci_low'], digits)}, {fmt(m['ci_high'], digits)}]"
        )
        lines.append(
            f"| {name} | {r['n']} | " + " | ".join(cells) + f" | {fmt(m['auroc'], digits)} | {ci} |"
        )
    return "\n".join(lines) + "\n"


def _tag(lp_data, train_dataset):
    return f"{train_dataset}-train" if train_dataset else lp_data


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="mmv-probe", description=__doc__.split("\n")[0])
    ap.add_argument("--embeddings", required=True, help="embedding .npz from mmv-embed")
    ap.add_argument("--lp-data", default="ALL", choices=list(LP_DATA))
    ap.add_argument(
        "--train-dataset",
        default=None,
        help="domain adaptation: train on this dataset's train split only (a "
        "dataset that is all test data, e.g. rad-chestct: a seeded 80%% of it) "
        "and test on its test rows",
    )
    ap.add_argument(
        "--policy",
        default="ignore",
        choices=list(POLICIES),
        help="uncertain labels in training: ignore (exclude), zeros, ones",
    )
    ap.add_argument("--test-datasets", nargs="*", default=None)
    ap.add_argument("--out", default=None, help="output dir (default: <embeddings dir>/probe)")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="compare with the paper's rows (reference_results.csv)",
    )
    ap.add_argument(
        "--stage",
        type=int,
        default=3,
        choices=(1, 2, 3),
        help="training stage for --compare (the paper's stages 1, 2, 3)",
    )
    ap.add_argument("--reference", default=None, help="reference_results.csv (default: bundled)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.bootstrap < 0:
        ap.error("--bootstrap must be >= 0")
    try:
        data = load_embeddings(args.embeddings)
        result = run_probe(
            data,
            lp_data=args.lp_data,
            train_dataset=args.train_dataset,
            policy=args.policy,
            n_boot=args.bootstrap,
            seed=args.seed,
            test_datasets=args.test_datasets,
        )
    except ValueError as e:
        print(f"mmv-probe: error: {e}", file=sys.stderr)
        return 2
    result["config"]["embeddings"] = os.path.abspath(args.embeddings)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.embeddings)), "probe")
    os.makedirs(out, exist_ok=True)
    tag = _tag(args.lp_data, args.train_dataset)
    md = results_markdown(result)
    with open(os.path.join(out, f"probe_{tag}.json"), "w") as f:
        json.dump(nan_to_none(result), f, indent=2)
    with open(os.path.join(out, f"probe_{tag}.md"), "w") as f:
        f.write(md)
    print(md)
    if args.compare:
        from mmv_jax.eval import reference

        try:
            rows = reference.load_reference(args.reference)
        except ValueError as e:
            print(f"mmv-probe: error: {e}", file=sys.stderr)
            return 2
        comp = reference.compare(result, rows, stage=args.stage)
        cmd = reference.comparison_markdown(comp)
        with open(os.path.join(out, f"comparison_{tag}_stage{args.stage}.json"), "w") as f:
            json.dump(nan_to_none(comp), f, indent=2)
        with open(os.path.join(out, f"comparison_{tag}_stage{args.stage}.md"), "w") as f:
            f.write(cmd)
        print(cmd)
    print(f"wrote {out}/probe_{tag}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
