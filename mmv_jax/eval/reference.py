"""The paper's results (``reference_results.csv``, Tables 1-3) beside ours (``mmv-probe --compare``).

The CSV ships in the package (``mmv_jax/eval/reference_results.csv``). Paper cells are kept as the CSV's strings, so the paper rows print exactly as published.

Our dataset names map to the paper's test sets (:func:`paper_test_set`): MIMIC, CheXpert,
CT-RATE, RAD-ChestCT (case and punctuation ignored). A probe trained on a dataset's own train
split (domain adaptation) maps to ``<test set>-adapted`` with LP data ``<test set>-train``
(Table 2). Anything else (e.g. the demo datasets) gets "no paper row".
"""

from __future__ import annotations

import csv
import math
import os
import re

from mmv_jax.eval.io import FINDINGS

ABBREV = ("ATEL", "CARD", "CONS", "LO", "EFF")
COLUMNS = (
    "table",
    "test_set",
    "model",
    "lp_data",
    "stage",
    *ABBREV,
    "macro",
    "macro_ci_low",
    "macro_ci_high",
)
OUR_MODEL = "MultiMedVision"
_PKG_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_results.csv")
_ALIASES = {
    "MIMIC": ("mimic", "mimiccxr", "mimiccxrjpg"),
    "CheXpert": ("chexpert",),
    "CT-RATE": ("ctrate",),
    "RAD-ChestCT": ("radchestct",),
}

# the paper's test-set sizes (images / volumes), to put beside ours
PAPER_TEST_SIZES = {"MIMIC": 33_537, "CheXpert": 668, "CT-RATE": 3_002, "RAD-ChestCT": 3_630}

__all__ = [
    "PAPER_TEST_SIZES",
    "load_reference",
    "reference_path",
    "paper_test_set",
    "paper_rows",
    "compare",
    "comparison_markdown",
    "paper_table_markdown",
]


def reference_path(path=None) -> str:
    if path is not None:
        return str(path)
    return _PKG_CSV


def _num(s):
    return float(s) if s.strip() else None


def load_reference(path=None) -> list[dict]:
    """Rows of the CSV: ``{"raw": {column: str}, "table": int, "test_set", "model", "lp_data",
    "stage": int | None, "values": {ABBREV: float | None}, "macro", "macro_ci_low",
    "macro_ci_high"}``."""
    path = reference_path(path)
    if not os.path.exists(path):
        raise ValueError(f"reference results not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        rows = []
        for raw in reader:
            rows.append(
                {
                    "raw": {c: raw[c] for c in COLUMNS},
                    "table": int(raw["table"]),
                    "test_set": raw["test_set"],
                    "model": raw["model"],
                    "lp_data": raw["lp_data"],
                    "stage": int(raw["stage"]) if raw["stage"].strip() else None,
                    "values": {a: _num(raw[a]) for a in ABBREV},
                    "macro": _num(raw["macro"]),
                    "macro_ci_low": _num(raw["macro_ci_low"]),
                    "macro_ci_high": _num(raw["macro_ci_high"]),
                }
            )
    return rows


def paper_test_set(name: str) -> str | None:
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    for paper, aliases in _ALIASES.items():
        if key in aliases:
            return paper
    return None


def paper_rows(rows, test_set: str, lp_data: str, stage: int | None, model: str = OUR_MODEL):
    """The paper's rows (any table) for one test set / LP data / stage."""
    return [
        r
        for r in rows
        if r["model"] == model
        and r["test_set"] == test_set
        and r["lp_data"] == lp_data
        and r["stage"] == stage
    ]


def _isnum(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def compare(result: dict, rows, *, stage: int = 3) -> list[dict]:
    """One entry per test set of ``result`` (from :func:`mmv_jax.eval.probe.run_probe`):
    ``{"test_set", "paper_test_set", "lp_data", "stage", "ours": {ABBREV..., "macro",
    "macro_ci_low", "macro_ci_high", "n"}, "paper": [{"table", "raw", "delta": {ABBREV...,
    "macro"}, "inside_ci": bool | None}], "n_paper", "n_match", "note"}``. ``delta`` = ours -
    paper (None where either is missing); ``inside_ci`` = our macro within the paper's macro CI
    (None: no paper CI); ``n_paper`` the paper's test-set size (None where it states none, e.g.
    the adapted RAD-ChestCT split) and ``n_match`` whether ours equals it."""
    cfg = result["config"]
    train_ds = cfg.get("train_dataset")
    out = []
    for name, r in result["test_sets"].items():
        ts = paper_test_set(name)
        lp = cfg["lp_data"]
        if ts is not None and train_ds is not None:
            src = paper_test_set(train_ds)
            ts, lp = (f"{ts}-adapted", f"{src}-train") if src == ts else (None, None)
        # the paper reports its five findings; any other finding of ours has no paper value
        ours = {
            a: r["per_label"].get(f, {}).get("auroc", math.nan) for a, f in zip(ABBREV, FINDINGS)
        }
        ours.update(
            macro=r["macro"]["auroc"],
            macro_ci_low=r["macro"]["ci_low"],
            macro_ci_high=r["macro"]["ci_high"],
            n=r["n"],
        )
        n_paper = PAPER_TEST_SIZES.get(ts)
        entry = {
            "test_set": name,
            "paper_test_set": ts,
            "lp_data": lp,
            "stage": stage,
            "ours": ours,
            "paper": [],
            "n_paper": n_paper,
            "n_match": None if n_paper is None else r["n"] == n_paper,
            "note": "",
        }
        for p in paper_rows(rows, ts, lp, stage) if ts else []:
            delta = {
                a: (
                    ours[a] - p["values"][a]
                    if _isnum(ours[a]) and p["values"][a] is not None
                    else None
                )
                for a in ABBREV
            }
            delta["macro"] = (
                ours["macro"] - p["macro"]
                if _isnum(ours["macro"]) and p["macro"] is not None
                else None
            )
            inside = None
            if p["macro_ci_low"] is not None and _isnum(ours["macro"]):
                inside = bool(p["macro_ci_low"] <= ours["macro"] <= p["macro_ci_high"])
            entry["paper"].append(
                {"table": p["table"], "raw": p["raw"], "delta": delta, "inside_ci": inside}
            )
        if not entry["paper"]:
            entry["note"] = "no paper row"
        out.append(entry)
    return out


def _f(v, digits=3, sign=False):
    if not _isnum(v):
        return "n/a"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


HEADER = (
    "| Test set | Source | LP data | Stage | "
    + " | ".join(ABBREV)
    + " | Macro | 95% CI | In paper CI |"
)
RULE = "|---|---|---|---:|" + "---:|" * len(ABBREV) + "---:|---|---|"


def _paper_line(raw, test_set_label, source, inside="") -> str:
    ci = f"[{raw['macro_ci_low']}, {raw['macro_ci_high']}]" if raw["macro_ci_low"].strip() else ""
    cells = [raw[a] for a in ABBREV]
    return (
        f"| {test_set_label} | {source} | {raw['lp_data']} | {raw['stage']} | "
        + " | ".join(cells)
        + f" | {raw['macro']} | {ci} | {inside} |"
    )


def comparison_markdown(comparison: list[dict]) -> str:
    """Our row, the paper's rows (CSV strings verbatim) and ``Δ`` rows (ours - paper)."""
    lines = [HEADER, RULE]
    for e in comparison:
        o = e["ours"]
        ci = (
            f"[{_f(o['macro_ci_low'])}, {_f(o['macro_ci_high'])}]"
            if _isnum(o["macro_ci_low"])
            else "n/a"
        )
        label = e["test_set"] + (f" ({e['paper_test_set']})" if e["paper_test_set"] else "")
        lines.append(
            f"| {label} | ours (n={o['n']}) | {e['lp_data'] or ''} | {e['stage']} | "
            + " | ".join(_f(o[a]) for a in ABBREV)
            + f" | {_f(o['macro'])} | {ci} | |"
        )
        if not e["paper"]:
            lines.append(f"| {label} | no paper row | | | " + " | " * len(ABBREV) + " | | |")
        for p in e["paper"]:
            inside = {True: "yes", False: "no", None: "no CI"}[p["inside_ci"]]
            lines.append(_paper_line(p["raw"], label, f"paper Table {p['table']}", inside))
            d = p["delta"]
            lines.append(
                f"| {label} | Δ vs Table {p['table']} | | | "
                + " | ".join(_f(d[a], sign=True) for a in ABBREV)
                + f" | {_f(d['macro'], sign=True)} | | |"
            )
    lines += [
        "",
        "Test-set sizes (a different size means a different test set):",
        "",
        "| Test set | n ours | n paper | |",
        "|---|---:|---:|---|",
    ]
    for e in comparison:
        label = e["test_set"] + (f" ({e['paper_test_set']})" if e["paper_test_set"] else "")
        n_paper = e.get("n_paper")
        mark = {True: "same", False: "MISMATCH", None: ""}[e.get("n_match")]
        lines.append(
            f"| {label} | {e['ours']['n']:,} | "
            f"{'n/a' if n_paper is None else f'{n_paper:,}'} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def paper_table_markdown(rows, table: int | None = None) -> str:
    """The paper's rows (optionally one table), verbatim from the CSV, in the comparison layout
    (with the model name as the source)."""
    lines = [HEADER, RULE]
    for r in rows:
        if table is None or r["table"] == table:
            lines.append(_paper_line(r["raw"], r["test_set"], f"{r['model']} (Table {r['table']})"))
    return "\n".join(lines) + "\n"
