"""Linear probe: embedding file round trip, planted signal vs noise, label policies, row
selection, domain adaptation, the CLI (JSON nulls, Markdown n/a, --compare)."""

import json

import numpy as np
import pytest

from mmv_jax.eval import probe
from mmv_jax.eval.probe import FINDINGS, load_embeddings, save_embeddings

FAST_C = (0.01, 1.0)


def make_data(seed=0, signal=4.0, d=12, val=True):
    """mimic (cxr: train/val/test), chexpert (cxr test), ct-rate (ct train/test); finding k
    shifts embedding dim k (cxr) or dim 5 + k (ct) by `signal`."""
    rng = np.random.default_rng(seed)
    parts = [
        ("mimic", "cxr", "train", 300),
        ("mimic", "cxr", "val" if val else "train", 80),
        ("mimic", "cxr", "test", 150),
        ("chexpert", "cxr", "test", 120),
        ("ct-rate", "ct", "train", 250),
        ("ct-rate", "ct", "test", 120),
    ]
    cols = {k: [] for k in ("dataset", "modality", "split")}
    for ds, mod, sp, n in parts:
        cols["dataset"] += [ds] * n
        cols["modality"] += [mod] * n
        cols["split"] += [sp] * n
    n = len(cols["dataset"])
    y = (rng.random((n, 5)) < 0.35).astype(np.float32)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    off = np.where(np.array(cols["modality"]) == "ct", 5, 0)
    for k in range(5):
        emb[np.arange(n), off + k] += signal * y[:, k]
    lab = y.copy()
    lab[rng.random((n, 5)) < 0.08] = -1
    lab[rng.random((n, 5)) < 0.08] = np.nan
    ids = np.array([f"{ds}/img_{i:05d}" for i, ds in enumerate(cols["dataset"])])
    return dict(ids=ids, embeddings=emb, labels=lab, **{k: np.array(v) for k, v in cols.items()})


def test_embedding_file_round_trip(tmp_path):
    d = make_data()
    d["ids"][0] = "ünïcode/ä very long id " + "x" * 40
    d["extra"] = np.arange(len(d["ids"]))
    path = save_embeddings(tmp_path / "sub" / "e.npz", **d)
    back = load_embeddings(path)
    assert back["ids"].tolist() == d["ids"].tolist()
    np.testing.assert_array_equal(back["labels"], d["labels"])  # NaN == NaN here
    np.testing.assert_array_equal(back["embeddings"], d["embeddings"])
    for k in ("modality", "dataset", "split", "extra"):
        assert back[k].tolist() == d[k].tolist()
    with np.load(path, allow_pickle=False) as f:  # no pickled objects
        assert f["ids"].dtype.kind == "U"
    bad = dict(d, labels=d["labels"][:, :4])
    with pytest.raises(ValueError, match="labels must be"):
        save_embeddings(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="missing arrays"):
        save_embeddings(tmp_path / "bad.npz", ids=d["ids"])
    with pytest.raises(ValueError, match="not found"):
        load_embeddings(tmp_path / "nope.npz")


def test_probe_targets_policies():
    lab = np.array([1, 0, -1, np.nan])
    y, m = probe.probe_targets(lab, "ignore")
    assert m.tolist() == [True, True, False, False] and y[:2].tolist() == [1, 0]
    y, m = probe.probe_targets(lab, "zeros")
    assert m.tolist() == [True, True, True, False] and y[:3].tolist() == [1, 0, 0]
    y, m = probe.probe_targets(lab, "ones")
    assert y[:3].tolist() == [1, 0, 1]
    with pytest.raises(ValueError):
        probe.probe_targets(lab, "soft")


def test_select_rows():
    d = make_data()
    tr, va, src = probe.select_rows(d, lp_data="2D")
    assert src == "split" and tr.size == 300 and va.size == 80
    assert set(d["modality"][tr]) == {"cxr"} and set(d["split"][va]) == {"val"}
    tr, va, src = probe.select_rows(d, lp_data="3D", seed=1)
    assert src == "holdout" and tr.size + va.size == 250 and va.size == 50
    assert not set(tr) & set(va)
    tr2, va2, _ = probe.select_rows(d, lp_data="3D", seed=1)
    assert (va == va2).all()
    tr, va, _ = probe.select_rows(d, lp_data="ALL")
    assert tr.size == 550 and va.size == 80
    with pytest.raises(ValueError, match="not in the file"):
        probe.select_rows(d, train_dataset="nope")


def test_planted_signal_recovered_and_noise_near_chance():
    d = make_data()
    res = probe.run_probe(d, lp_data="ALL", n_boot=100, c_grid=FAST_C)
    assert set(res["test_sets"]) == {"mimic", "chexpert", "ct-rate"}
    for name, r in res["test_sets"].items():
        assert r["macro"]["auroc"] > 0.95, (name, r["macro"])
        assert all(r["per_label"][f]["auroc"] > 0.9 for f in FINDINGS)
        assert r["macro"]["ci_low"] <= r["macro"]["auroc"] <= r["macro"]["ci_high"]
    noise = probe.run_probe(make_data(1, signal=0.0), lp_data="ALL", n_boot=50, c_grid=FAST_C)
    for name, r in noise["test_sets"].items():
        assert abs(r["macro"]["auroc"] - 0.5) < 0.1, (name, r["macro"])
    # LP on 2D only does not transfer to CT (signal in other dims)
    r2d = probe.run_probe(d, lp_data="2D", n_boot=0, c_grid=FAST_C)["test_sets"]
    assert r2d["mimic"]["macro"]["auroc"] > 0.95 and r2d["ct-rate"]["macro"]["auroc"] < 0.75


def test_domain_adaptation_trains_on_target_only():
    d = make_data()
    res = probe.run_probe(d, train_dataset="ct-rate", n_boot=20, c_grid=FAST_C)
    assert list(res["test_sets"]) == ["ct-rate"]
    assert res["config"]["n_train"] + res["config"]["n_val"] == 250
    assert res["test_sets"]["ct-rate"]["macro"]["auroc"] > 0.95


def test_cli_undefined_label_json_markdown_and_compare(tmp_path, capsys):
    d = make_data(val=False)
    test_chex = d["dataset"] == "chexpert"
    d["labels"][test_chex, 1] = 0.0  # cardiomegaly: one class in chexpert
    path = save_embeddings(tmp_path / "e.npz", **d)
    out = tmp_path / "out"
    rc = probe.main(
        [
            "--embeddings",
            str(path),
            "--out",
            str(out),
            "--bootstrap",
            "30",
            "--compare",
            "--stage",
            "3",
        ]
    )
    assert rc == 0
    js = json.loads((out / "probe_ALL.json").read_text())
    chex = js["test_sets"]["chexpert"]
    assert chex["per_label"]["cardiomegaly"]["auroc"] is None
    assert chex["per_label"]["cardiomegaly"]["ci_low"] is None
    assert chex["macro"]["auroc"] > 0.9
    assert js["config"]["val_source"] == "holdout"
    md = (out / "probe_ALL.md").read_text()
    chex_line = [l for l in md.splitlines() if l.startswith("| chexpert")][0]
    assert chex_line.split("|")[4].strip() == "n/a"
    cmp_md = (out / "comparison_ALL_stage3.md").read_text()
    assert "| 0.83 | 0.85 | 0.79 | 0.83 | 0.89 | 0.84 | [0.79, 0.88] |" in cmp_md
    assert "CT-RATE" in cmp_md
    cmp_js = json.loads((out / "comparison_ALL_stage3.json").read_text())
    assert {e["test_set"] for e in cmp_js} == {"mimic", "chexpert", "ct-rate"}
    assert capsys.readouterr().out
    assert probe.main(["--embeddings", str(tmp_path / "missing.npz")]) == 2


def test_grouped_holdout_keeps_patients_whole():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), rng.integers(1, 6, 100))
    held = probe.grouped_holdout(groups, 0.2, seed=3)
    assert not set(groups[held]) & set(groups[~held])
    assert abs(held.sum() - 0.2 * groups.size) <= 5
    assert (held == probe.grouped_holdout(groups, 0.2, seed=3)).all()
    assert (held != probe.grouped_holdout(groups, 0.2, seed=4)).any()


def test_validation_holdout_is_grouped_by_patient():
    d = make_data(val=False)
    d["group"] = np.arange(len(d["ids"])) // 4  # four rows per patient
    tr, va, src = probe.select_rows(d, lp_data="ALL", seed=2)
    assert src == "holdout" and va.size and tr.size
    assert not set(d["group"][tr]) & set(d["group"][va])
    assert not set(va) & set(np.flatnonzero(d["split"] == "test"))  # never the test split


def test_external_test_sets_never_train_the_2d_3d_all_probes():
    d = make_data()
    d["dataset"] = np.where(
        (d["dataset"] == "ct-rate") & (np.arange(len(d["ids"])) % 7 == 0),
        "rad-chestct",
        d["dataset"],
    )  # rad-chestct rows in train
    with pytest.raises(ValueError, match="rad-chestct is an external test set"):
        probe.select_rows(d, lp_data="3D")
    with pytest.raises(ValueError, match="external test set"):
        probe.run_probe(d, lp_data="ALL", n_boot=0, c_grid=FAST_C)


def test_adaptation_splits_an_all_test_dataset_80_20():
    """RAD-ChestCT is all test data: the adaptation probe trains on a seeded 80% of it and is
    tested on the other 20%; the 2D/3D/ALL probes never train on it."""
    d = make_data()
    ct_test = (d["dataset"] == "ct-rate") & (d["split"] == "test")
    ct_train = (d["dataset"] == "ct-rate") & (d["split"] == "train")
    d["dataset"] = np.where(ct_test | ct_train, "rad-chestct", d["dataset"])
    d["split"] = np.where(ct_train, "test", d["split"])  # 370 volumes, all test
    n_rad = int((d["dataset"] == "rad-chestct").sum())
    res = probe.run_probe(d, train_dataset="rad-chestct", n_boot=20, c_grid=FAST_C)
    cfg, test = res["config"], res["test_sets"]["rad-chestct"]
    assert cfg["n_train"] + cfg["n_val"] + test["n"] == n_rad
    assert test["n"] == pytest.approx(0.2 * n_rad, abs=1)
    assert test["macro"]["auroc"] > 0.9
    split = probe.adaptation_split(d, "rad-chestct", seed=0)["split"]
    assert (split == probe.adaptation_split(d, "rad-chestct", seed=0)["split"]).all()
    d["group"] = np.arange(len(d["ids"])) // 3  # three scans per patient
    split = probe.adaptation_split(d, "rad-chestct", seed=0)["split"]
    rad = d["dataset"] == "rad-chestct"
    assert not set(d["group"][rad & (split == "train")]) & set(d["group"][rad & (split == "test")])
    r_all = probe.run_probe(d, lp_data="ALL", n_boot=0, c_grid=FAST_C)
    assert r_all["test_sets"]["rad-chestct"]["n"] == n_rad  # all of it stays test
    assert r_all["config"]["n_train"] + r_all["config"]["n_val"] == 380  # mimic rows only
