"""Analyses write their figures (PNG, non-empty) on small synthetic arrays; PCA maps and
PCA probes behave."""

import json
import os

import numpy as np
import pytest

from mmv_jax.eval import analysis

PNG = b"\x89PNG\r\n\x1a\n"


def png_ok(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG and os.path.getsize(path) > 1000


def make_data(seed=0, d=12):
    rng = np.random.default_rng(seed)
    parts = [
        ("mimic", "cxr", "train", 200),
        ("mimic", "cxr", "test", 100),
        ("ct-rate", "ct", "train", 200),
        ("ct-rate", "ct", "test", 100),
    ]
    ds, mod, sp = (np.concatenate([[p[i]] * p[3] for p in parts]) for i in range(3))
    n = ds.size
    y = (rng.random((n, 5)) < 0.4).astype(np.float32)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    off = np.where(mod == "ct", 5, 0)
    for k in range(5):
        emb[np.arange(n), off + k] += 4.0 * y[:, k]
    return dict(
        ids=np.array([str(i) for i in range(n)]),
        embeddings=emb,
        labels=y,
        dataset=ds,
        modality=mod,
        split=sp,
    )


def test_pca_feature_map_shapes_and_range():
    rng = np.random.default_rng(0)
    tok2d = rng.normal(size=(4 * 6, 32))
    rgb = analysis.pca_feature_map(tok2d, (1, 4, 6))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_allclose(rgb.reshape(-1, 3).min(0), 0, atol=1e-6)
    np.testing.assert_allclose(rgb.reshape(-1, 3).max(0), 1, atol=1e-6)
    # 3D: the middle depth slice; tokens in z-major order
    tok3d = rng.normal(size=(3 * 4 * 5, 16))
    tok3d[40:60] += 5.0  # slice z=2 differs strongly
    mid = analysis.pca_feature_map(tok3d, (3, 4, 5))
    last = analysis.pca_feature_map(tok3d, (3, 4, 5), slice_index=2)
    assert mid.shape == (4, 5, 3)
    assert np.array_equal(mid, analysis.pca_feature_map(tok3d, (3, 4, 5), slice_index=1))
    # PC1 separates slice z=2 from the rest: opposite ends of the red channel
    assert (mid[..., 0] < 0.5).all() and (last[..., 0] > 0.5).all()
    # fewer than three tokens' worth of components still works
    assert analysis.pca_feature_map(rng.normal(size=(2, 8)), (1, 1, 2)).shape == (1, 2, 3)
    with pytest.raises(ValueError):
        analysis.pca_feature_map(tok2d, (1, 5, 6))


def test_feature_map_and_loss_figures(tmp_path):
    rng = np.random.default_rng(1)
    p = analysis.save_feature_map_figure(
        rng.random((56, 84)),
        rng.normal(size=(24, 16)),
        (1, 4, 6),
        tmp_path / "fm2d.png",
        title="demo",
    )
    assert png_ok(p)
    p = analysis.save_feature_map_figure(
        rng.random((28, 56, 70)), rng.normal(size=(60, 16)), (3, 4, 5), tmp_path / "fm3d.png"
    )
    assert png_ok(p)
    m = tmp_path / "metrics.jsonl"
    lines = [
        json.dumps(
            {
                "step": s,
                "loss": 1.0 / (s + 1),
                "pred_loss": 0.5 / (s + 1),
                "sigreg_loss": 2.0 + s,
                "lr": 1e-4,
            }
        )
        for s in range(20)
    ]
    m.write_text("\n".join(lines[:10] + ["not json", "{}"] + lines[10:]) + "\n")
    assert png_ok(analysis.plot_loss_curve(m, tmp_path / "curves" / "loss.png"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError):
        analysis.plot_loss_curve(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_robustness_grid_and_pca_probe(tmp_path):
    d = make_data()
    grid = analysis.robustness_grid(d, n_boot=20, c_grid=(1.0,))
    assert list(grid) == ["2D", "3D", "ALL"]
    m = {lp: {t: r["macro"]["auroc"] for t, r in g["test_sets"].items()} for lp, g in grid.items()}
    assert m["2D"]["mimic"] > 0.95 and m["2D"]["ct-rate"] < 0.75
    assert m["3D"]["ct-rate"] > 0.95 and m["ALL"]["mimic"] > 0.95
    md = analysis.robustness_markdown(grid)
    assert md.count("\n") == 5 and "ct-rate" in md
    assert png_ok(analysis.plot_robustness_grid(grid, tmp_path / "grid.png"))
    pcs = analysis.pca_analysis(d, n_components=12, c_grid=(1.0,))
    assert list(pcs) == ["2D-fit", "3D-fit", "joint-fit"]
    j = pcs["joint-fit"]
    assert np.array(j["abs_coef"]).shape == (5, 12)
    assert j["test_sets"]["mimic"]["macro"]["auroc"] > 0.9
    assert len(j["top_pcs"]["atelectasis"]) == 3
    few = analysis.pca_probe(d, fit_on="2D", n_components=2, c_grid=(1.0,))
    assert few["n_components"] == 2 and few["n_fit"] == 200
    assert png_ok(analysis.plot_pca_coefficients(pcs, tmp_path / "pca.png"))


def test_analysis_cli(tmp_path):
    from mmv_jax.eval.probe import save_embeddings

    e = save_embeddings(tmp_path / "e.npz", **make_data(1))
    m = tmp_path / "metrics.jsonl"
    m.write_text(
        "".join(
            json.dumps({"step": s, "loss": 1.0, "pred_loss": 0.5, "sigreg_loss": 1.0}) + "\n"
            for s in range(3)
        )
    )
    out = tmp_path / "a"
    assert (
        analysis.main(
            [
                "--embeddings",
                str(e),
                "--out",
                str(out),
                "--metrics",
                str(m),
                "--bootstrap",
                "10",
                "--n-components",
                "4",
            ]
        )
        == 0
    )
    for f in ("robustness.png", "pca_shared.png", "pca_coef.png", "loss_curve.png"):
        assert png_ok(out / f)
    assert json.loads((out / "pca_probe.json").read_text())["3D-fit"]["n_fit"] == 200
    shared = json.loads((out / "pca_shared.json").read_text())
    assert shared["n_fit"] == 400 and set(shared["probes"]) == {
        "2D-fitted",
        "3D-fitted",
        "joint-fitted",
    }
    assert "2D-fitted" in (out / "pca_shared.md").read_text()
    assert analysis.main(["--out", str(out)]) == 2  # nothing to analyse
    assert analysis.main(["--checkpoint", str(tmp_path), "--out", str(out)]) == 2


def test_shared_pca_basis_shows_the_2d_probe_cannot_read_ct(tmp_path):
    """Fig. 2a: cardiomegaly lives in dim 1 for X-rays and dim 6 for CT. In one PCA basis fitted
    on all training rows, the 2D-fitted probe predicts it in 2D only, the 3D-fitted in 3D only,
    and they lean on different components; the joint-fitted probe reads both."""
    d = make_data()
    res = analysis.shared_pca_probe(d, n_components=10, c_grid=(1.0,))
    assert res["n_fit"] == 400 and res["n_components"] == 10  # ALL training rows, one basis
    assert res["findings"][0] == "cardiomegaly"
    p = res["probes"]
    assert list(p) == ["2D-fitted", "3D-fitted", "joint-fitted"]
    card = {n: p[n]["per_modality"] for n in p}
    assert list(card["2D-fitted"]["2D"])[0] == "cardiomegaly"
    assert card["2D-fitted"]["2D"]["cardiomegaly"] > 0.9
    assert card["2D-fitted"]["3D"]["cardiomegaly"] < 0.65
    assert card["3D-fitted"]["3D"]["cardiomegaly"] > 0.9
    assert card["3D-fitted"]["2D"]["cardiomegaly"] < 0.65
    assert min(card["joint-fitted"][m]["cardiomegaly"] for m in ("2D", "3D")) > 0.85
    top2d, top3d = (
        p["2D-fitted"]["top_pcs"]["cardiomegaly"],
        p["3D-fitted"]["top_pcs"]["cardiomegaly"],
    )
    assert top2d[0] != top3d[0]
    assert {top2d[0], top3d[0]} <= set(p["joint-fitted"]["top_pcs"]["cardiomegaly"][:2])
    md = analysis.shared_pca_markdown(res)
    assert "| 2D-fitted |" in md and "2D CARD" in md and "3D CARD" in md
    assert png_ok(analysis.plot_shared_pca(res, tmp_path / "pca_shared.png"))


def test_feature_maps_share_one_pca_across_images(tmp_path):
    from mmv_jax.eval import feature_maps

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 16)), rng.normal(size=(12, 16))
    b[:, 0] += 20.0  # image b sits far along one direction
    ma, mb = feature_maps.pca_feature_maps([a, b], [(1, 3, 4), (1, 3, 4)])
    assert ma.shape == mb.shape == (3, 4, 3)
    # one PCA and one scaling across both: PC1 (red) separates the images, not pixels within one
    assert ma[..., 0].max() < 0.5 < mb[..., 0].min()
    assert png_ok(
        feature_maps.save_feature_maps_figure(
            [rng.random((42, 56)), rng.random((14, 42, 56))],
            [a, b],
            [(1, 3, 4), (1, 3, 4)],
            tmp_path / "maps.png",
        )
    )


def test_feature_map_figure_from_an_encoder(tmp_path):
    """mmv-analysis's maps for a checkpoint: a (random-init) encoder on one X-ray and one CT."""
    from helpers import tiny_config

    from mmv_jax.data import pipeline, synthetic
    from mmv_jax.data.manifest import load_manifest
    from mmv_jax.eval import embed
    from mmv_jax.train import sharding as shd

    cfg = tiny_config(**{"model.depth": 1})
    cfg.data = pipeline.demo_config()
    records = load_manifest(synthetic.make_demo_dataset(str(tmp_path / "d"), n_cxr=1, n_ct=1))
    enc = embed.build_encoder(cfg, None, shd.make_mesh((-1, 1, 1)), random_init=True)
    out = analysis.feature_map_figure(cfg, enc, records, tmp_path / "pca_maps.png")
    assert png_ok(out)
