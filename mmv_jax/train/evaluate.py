"""Evaluation during training: every ``config.eval_every_steps`` steps, a linear probe's AUROC.

At an eval step the current encoder embeds two fixed, seeded subsets of the manifest, at most
``config.eval.max_images`` labelled images each: the training rows (split ``train``) and the
validation rows (split ``config.data.eval_split``), one whole-image view per image, through
``mmv-embed``'s own path (:func:`mmv_jax.eval.embed.embed`; the forward pass is compiled once
and reused). A logistic-regression probe per finding (:func:`mmv_jax.eval.probe.fit_probe`, C =
``config.eval.probe_c``, no selection: the validation rows only measure) is fitted on the
training embeddings and scored on the validation ones. The row written to ``metrics.jsonl`` and
TensorBoard: ``eval/macro_auroc``, ``eval/auroc/<finding>`` (null where undefined),
``eval/n_train``, ``eval/n_val``, ``eval/seconds``. The embeddings of the latest eval stay in
``workdir/eval/step_<N>.npz`` (an embedding file: ``mmv-probe`` reads it).

Several processes: every process embeds its share of the images in lockstep (the same
collectives everywhere), reads all of them back, and fits the same probe; so the workdir must be
a file system every process sees (as a cluster's run folder is), not a URI. With one process a
URI workdir keeps the eval embeddings in a local temporary folder.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import tempfile
import time

import jax
import numpy as np

from mmv_jax import paths
from mmv_jax.data import pipeline
from mmv_jax.data.manifest import Records, load_manifest
from mmv_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _subset(records, cap: int, seed: int) -> list:
    """At most ``cap`` of ``records`` that hold a label, a seeded choice kept in manifest order."""
    labelled = [r for r in records if r.labels]
    if len(labelled) <= cap:
        return labelled
    keep = np.sort(np.random.default_rng(seed).permutation(len(labelled))[:cap])
    return [labelled[i] for i in keep]


def probe_auroc(data: dict, *, val_split: str, c: float, seed: int = 0) -> dict:
    """Fits the probe on ``data``'s train rows and scores its ``val_split`` rows:
    ``{"macro": float, "per_finding": {finding: float}}`` (NaN where undefined)."""
    from mmv_jax.eval.io import findings_of
    from mmv_jax.eval.metrics import macro_auroc
    from mmv_jax.eval.probe import fit_probe

    split = np.asarray(data["split"]).astype(str)
    train, val = split == "train", split == val_split
    x, lab = data["embeddings"], np.asarray(data["labels"], np.float64)
    probe = fit_probe(x[train], lab[train], x[train], lab[train], c_grid=(float(c),), seed=seed)
    scores = probe.decision(x[val])
    labels = lab[val].copy()
    labels[:, np.isnan(scores).any(0)] = np.nan  # a finding without a probe is undefined
    per, macro = macro_auroc(labels, np.nan_to_num(scores))
    return {"macro": float(macro), "per_finding": dict(zip(findings_of(data), map(float, per)))}


def validate(cfg) -> None:
    """The eval keys, named on failure (before any compile)."""
    every = cfg.get("eval_every_steps", 0)
    if not isinstance(every, int) or every < 0:
        raise ConfigError(
            f"config.eval_every_steps must be an integer >= 0 (0: off), got {every!r}"
        )
    if not every:
        return
    e = cfg.eval
    for key in ("max_images", "batch_size"):
        if not isinstance(e[key], int) or e[key] < 1:
            raise ConfigError(f"config.eval.{key} must be a positive integer, got {e[key]!r}")
    if not (isinstance(e.probe_c, (int, float)) and math.isfinite(e.probe_c) and e.probe_c > 0):
        raise ConfigError(f"config.eval.probe_c must be a positive number, got {e.probe_c!r}")
    if cfg.data.eval_split == "train":
        raise ConfigError("config.data.eval_split must not be 'train' (the probe trains there)")


class Evaluator:
    """``maybe_run(step, state)`` -> the eval row at eval steps, else None (see module doc)."""

    def __init__(self, cfg, workdir, mesh):
        validate(cfg)
        self.every = int(cfg.get("eval_every_steps", 0))
        if not self.every:
            return
        from flax import nnx

        from mmv_jax.eval import embed
        from mmv_jax.train import state as st

        manifest = pipeline.manifest_path(cfg.data)
        records = load_manifest(manifest)
        split, cap = cfg.data.eval_split, int(cfg.eval.max_images)
        train = _subset([r for r in records if r.split == "train"], cap, cfg.seed)
        val = _subset([r for r in records if r.split == split], cap, cfg.seed + 1)
        for name, rows in (("train", train), (split, val)):
            if not rows:
                raise ConfigError(
                    f"config.eval_every_steps={self.every}: {manifest} has no "
                    f"labelled record in split {name!r} (config.data.eval_split "
                    "names the validation split)"
                )
        self.records = Records(train + val, records.findings)
        self.val_split, self.c, self.seed = split, float(cfg.eval.probe_c), int(cfg.seed)
        self.batch_size, self.mesh = int(cfg.eval.batch_size), mesh
        self.cfg = embed.embed_config(cfg, {r.modality for r in self.records})
        abstract = nnx.eval_shape(lambda: st.build_model(self.cfg, seed=cfg.seed))
        graphdef, _ = nnx.split(abstract, nnx.Param)
        # params are an argument: one compile serves every eval
        self._forward = jax.jit(lambda params, batch: nnx.merge(graphdef, params).encoder(batch))
        if paths.is_uri(os.fspath(workdir)):
            if jax.process_count() > 1:
                raise ConfigError(
                    f"config.eval_every_steps with {jax.process_count()} processes "
                    f"needs a workdir on a shared file system, not {workdir}"
                )
            self.folder = tempfile.mkdtemp(prefix="mmv-eval-")
        else:
            self.folder = os.path.join(os.fspath(workdir), "eval")
        log.info(
            "eval every %d steps: %d train + %d %s images", self.every, len(train), len(val), split
        )

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def maybe_run(self, step: int, state) -> dict | None:
        if not self.every or step % self.every:
            return None
        from mmv_jax.eval import embed

        t0 = time.perf_counter()
        out = os.path.join(self.folder, f"step_{step}.npz")
        data = embed.embed(
            self.cfg,
            self.records,
            None,
            out,
            self.mesh,
            batch_size=self.batch_size,
            progress=False,
            forward=lambda batch: self._forward(state.params, batch),
        )
        res = probe_auroc(data, val_split=self.val_split, c=self.c, seed=self.seed)
        if jax.process_index() == 0:  # keep the latest eval's embeddings only
            for f in glob.glob(os.path.join(self.folder, "step_*.npz")):
                if f != out:
                    os.remove(f)
        split = np.asarray(data["split"]).astype(str)
        row = {
            "eval/macro_auroc": res["macro"],
            **{f"eval/auroc/{f}": v for f, v in res["per_finding"].items()},
            "eval/n_train": int((split == "train").sum()),
            "eval/n_val": int((split == self.val_split).sum()),
            "eval/seconds": time.perf_counter() - t0,
        }
        log.info(
            "step %d: eval macro AUROC %.4f (%d train / %d %s images, %.1f s)",
            step,
            res["macro"],
            row["eval/n_train"],
            row["eval/n_val"],
            self.val_split,
            row["eval/seconds"],
        )
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
