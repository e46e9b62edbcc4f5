"""``make demo`` end to end on the built-in demo data, on a CPU:

write the demo data set -> pretrain ViT-Ti/14 (configs/demo.py) -> embed every image with the
trained and with a random-init encoder -> linear probes -> one table (finding x AUROC, trained vs
random init), a loss-curve plot and PCA feature maps (``mmv-analysis``), and ``runs/demo/demo_report.json``.

  python -m launch.demo [--workdir runs/demo] [--data data/demo] [--config.total_steps=N ...]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from mmv_jax import errors
from mmv_jax.hugepages import reexec_with_hugepages

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run folder.")
_DATA = flags.DEFINE_string("data", "data/demo", "Demo data folder (written when missing).")


def _main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    logging.getLogger("mmv_jax").setLevel(logging.INFO)
    t0 = time.time()
    import numpy as np

    from mmv_jax.data import synthetic
    from mmv_jax.data.manifest import load_manifest
    from mmv_jax.eval import analysis, embed, probe
    from mmv_jax.eval.io import FINDINGS
    from mmv_jax.eval.metrics import nan_to_none
    from mmv_jax.train import sharding as shd
    from mmv_jax.train.loop import train_and_evaluate

    cfg = _CONFIG.value
    workdir = os.path.abspath(_WORKDIR.value)
    manifest = os.path.join(_DATA.value, "manifest.jsonl")
    if not os.path.exists(manifest):
        print(f"[demo] writing the demo data set to {_DATA.value}")
        synthetic.main(["--out", _DATA.value])
    cfg.data.manifest = manifest
    print(f"[demo] pretraining {cfg.model.variant} for {cfg.total_steps} steps into {workdir}")
    try:
        train_and_evaluate(cfg, workdir)
    except errors.user_errors() as e:
        sys.exit(f"[demo] {e}")

    mesh = shd.make_mesh((-1, 1, 1))
    records = load_manifest(manifest)
    report = {"auroc": {}}
    results = {}
    for name, random_init in (("trained", False), ("random_init", True)):
        print(f"[demo] embedding {len(records)} images with the {name.replace('_', '-')} encoder")
        enc = embed.build_encoder(cfg, workdir, mesh, random_init=random_init)
        data = embed.embed(cfg, records, enc, os.path.join(workdir, f"embeddings_{name}.npz"), mesh)
        res = probe.run_probe(data, lp_data="ALL", n_boot=1000, seed=0)
        results[name] = res
        with open(os.path.join(workdir, f"probe_{name}.json"), "w") as f:
            json.dump(nan_to_none(res), f, indent=1)
        (test_set,) = res["test_sets"].values()
        report["auroc"][name] = {f: test_set["per_label"][f]["auroc"] for f in FINDINGS}
        report["auroc"][name]["macro"] = test_set["macro"]["auroc"]
        report["auroc"][name]["macro_ci"] = [
            test_set["macro"]["ci_low"],
            test_set["macro"]["ci_high"],
        ]
        if name == "trained":  # one PCA across two test images of each modality
            fig = analysis.feature_map_figure(
                cfg, enc, records, os.path.join(workdir, "pca_maps.png"), per_modality=2
            )
            figures = [fig] if fig else []
    figures.append(
        analysis.plot_loss_curve(
            os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png")
        )
    )
    report["seconds"] = time.time() - t0
    report["figures"] = figures
    with open(os.path.join(workdir, "demo_report.json"), "w") as f:
        json.dump(nan_to_none(report), f, indent=1)

    fmt = lambda v: "  n/a" if v is None or np.isnan(v) else f"{v:.3f}"
    print(
        "\nLinear probe on the demo test split (AUROC; LP trained on the train split, "
        "C chosen on val):\n"
    )
    print(f"{'finding':<20}{'trained':>10}{'random-init':>14}")
    for f in list(FINDINGS) + ["macro"]:
        print(
            f"{f:<20}{fmt(report['auroc']['trained'][f]):>10}{fmt(report['auroc']['random_init'][f]):>14}"
        )
    lo, hi = report["auroc"]["trained"]["macro_ci"]
    print(f"\ntrained macro AUROC 95% CI [{fmt(lo)}, {fmt(hi)}]")
    print(f"report: {os.path.join(workdir, 'demo_report.json')}; figures: {', '.join(figures)}")
    print(
        f"checkpoints: {os.path.join(workdir, 'checkpoints')}; metrics: {os.path.join(workdir, 'metrics.jsonl')}"
    )
    print(f"total {report['seconds']:.0f} s")


def main():
    reexec_with_hugepages()
    app.run(_main)


if __name__ == "__main__":
    main()
