"""The comparison with the paper reproduces reference_results.csv exactly."""

import csv

import pytest

from mmv_jax.eval import reference
from mmv_jax.eval.probe import FINDINGS

CSV_COLS = ("ATEL", "CARD", "CONS", "LO", "EFF", "macro")


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.parametrize("path", [None, reference._PKG_CSV])
def test_paper_table_reproduces_csv(path):
    rows = reference.load_reference(path)
    raw = csv_rows(reference.reference_path(path))
    assert len(rows) == len(raw) == 38
    lines = reference.paper_table_markdown(rows).splitlines()[2:]
    assert len(lines) == len(raw)
    for line, r in zip(lines, raw):
        c = cells(line)
        assert c[0] == r["test_set"] and c[2] == r["lp_data"] and c[3] == r["stage"]
        assert c[4:10] == [r[k] for k in CSV_COLS]
        ci = f"[{r['macro_ci_low']}, {r['macro_ci_high']}]" if r["macro_ci_low"] else ""
        assert c[10] == ci


def fake_result(names, lp="ALL", train_dataset=None, macro=0.815):
    per = {
        f: {"auroc": 0.8 + 0.01 * i, "ci_low": 0.7, "ci_high": 0.9} for i, f in enumerate(FINDINGS)
    }
    per["consolidation"]["auroc"] = float("nan")
    return {
        "config": {"lp_data": lp, "train_dataset": train_dataset},
        "test_sets": {
            n: {
                "n": 10,
                "per_label": per,
                "macro": {"auroc": macro, "ci_low": 0.8, "ci_high": 0.83},
            }
            for n in names
        },
    }


def test_compare_rows_deltas_and_ci():
    rows = reference.load_reference()
    raw = csv_rows(reference.reference_path())
    comp = reference.compare(fake_result(["MIMIC-CXR", "chexpert", "demo_cxr"]), rows, stage=3)
    mimic, chex, demo = comp
    assert mimic["paper_test_set"] == "MIMIC" and [p["table"] for p in mimic["paper"]] == [1, 3]
    t1 = mimic["paper"][0]
    assert t1["raw"] == {k: v for k, v in raw[3].items()}  # MIMIC, MultiMedVision, ALL, 3
    assert t1["delta"]["ATEL"] == pytest.approx(0.80 - 0.81)
    assert t1["delta"]["CONS"] is None  # ours undefined
    assert t1["delta"]["macro"] == pytest.approx(0.815 - 0.82)
    assert t1["inside_ci"] is True
    assert mimic["paper"][1]["delta"]["ATEL"] is None  # table 3: macro only
    assert chex["paper"][0]["inside_ci"] is True  # [0.79, 0.88]
    assert demo["paper"] == [] and demo["note"] == "no paper row"
    md = reference.comparison_markdown(comp)
    assert "| 0.81 | 0.82 | 0.81 | 0.76 | 0.90 | 0.82 | [0.81, 0.83] | yes |" in md
    assert "no paper row" in md and "n/a" in md and "-0.010" in md
    out = reference.compare(fake_result(["CT-RATE"], macro=0.70), rows, stage=1)[0]
    assert [p["raw"]["macro"] for p in out["paper"]] == ["0.74"]
    assert out["paper"][0]["inside_ci"] is False
    out = reference.compare(fake_result(["mimic"], lp="3D"), rows, stage=3)[0]
    assert [p["raw"]["macro"] for p in out["paper"]] == ["0.53"]


def test_compare_domain_adaptation_and_names():
    rows = reference.load_reference()
    out = reference.compare(fake_result(["rad-chestct"], train_dataset="RAD_ChestCT"), rows)[0]
    assert out["paper_test_set"] == "RAD-ChestCT-adapted"
    assert [p["table"] for p in out["paper"]] == [2]
    assert out["paper"][0]["raw"]["macro"] == "0.75"
    for name, want in [
        ("mimic_cxr", "MIMIC"),
        ("CheXpert", "CheXpert"),
        ("ct_rate", "CT-RATE"),
        ("RAD-ChestCT", "RAD-ChestCT"),
        ("demo", None),
    ]:
        assert reference.paper_test_set(name) == want


def test_compare_prints_test_set_sizes_beside_the_papers():
    rows = reference.load_reference()
    res = fake_result(["mimic", "chexpert", "ct-rate", "rad-chestct", "demo"])
    res["test_sets"]["chexpert"]["n"] = 668
    comp = reference.compare(res, rows)
    by = {e["test_set"]: e for e in comp}
    assert [by[n]["n_paper"] for n in ("mimic", "chexpert", "ct-rate", "rad-chestct")] == [
        33537,
        668,
        3002,
        3630,
    ]
    assert by["chexpert"]["n_match"] is True and by["mimic"]["n_match"] is False
    assert by["demo"]["n_paper"] is None and by["demo"]["n_match"] is None
    md = reference.comparison_markdown(comp)
    assert "| mimic (MIMIC) | 10 | 33,537 | MISMATCH |" in md
    assert "| chexpert (CheXpert) | 668 | 668 | same |" in md
    assert "| demo | 10 | n/a |  |" in md
    adapted = reference.compare(fake_result(["rad-chestct"], train_dataset="rad-chestct"), rows)[0]
    assert adapted["n_paper"] is None  # the paper states no size for its adaptation split
