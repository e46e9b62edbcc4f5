"""``mmv-embed``: frozen-encoder embeddings of every image in a manifest (one whole-image view each).

  mmv-embed --checkpoint runs/demo --manifest data/demo/manifest.jsonl --out runs/demo/emb.npz
  mmv-embed --checkpoint runs/demo --step 300 --manifest ... --out ...   (or runs/demo/checkpoints/300)
  mmv-embed --checkpoint runs/demo --random-init --manifest ... --out runs/demo/emb_random.npz

The run's ``config.json`` (written by ``mmv-train``) gives the model and data settings (or
``--config configs/X.py``). Images are packed and batched like training and the encoder runs
sharded over all devices, in one or several processes (launched like ``mmv-train``). Resumable: finished batches are kept in ``OUT.partial/``; a rerun
embeds only the images not there yet, then writes ``OUT`` (see ``eval/io.py`` for the format).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mmv_jax import cli, images
from mmv_jax.data import pipeline
from mmv_jax.data.manifest import LABELS, ManifestError, load_manifest
from mmv_jax.eval.io import save_embeddings
from mmv_jax.hugepages import reexec_with_hugepages
from mmv_jax.model.axes import axis_rules
from mmv_jax.train import checkpoint, distributed, sharding as shd, state as st

log = logging.getLogger(__name__)


def load_run_config(run_dir: str, config_path: str | None = None) -> ml_collections.ConfigDict:
    if config_path:
        spec = importlib.util.spec_from_file_location("mmv_config", config_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"no config.json in {run_dir}; pass --config configs/X.py")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def embed_config(cfg, modalities=("cxr", "ct")) -> ml_collections.ConfigDict:
    """A copy of the run's config whose attention bound covers one whole image of each of
    ``modalities``: a run's own bound is its largest training view, and a 2D-only (stage 1)
    run's is a whole X-ray, shorter than a whole CT. A bound of 0 (dense attention) stays."""
    cfg = cfg.copy_and_resolve_references()
    if cfg.model.max_segment_len:
        t2, t3 = pipeline.max_view_tokens(cfg.data)
        cfg.model.max_segment_len = max(
            t2 if "cxr" in modalities else 0, t3 if "ct" in modalities else 0, 1
        )
    return cfg


def build_encoder(
    cfg,
    run_dir: str | None,
    mesh,
    *,
    random_init: bool = False,
    modalities=("cxr", "ct"),
    step: int | None = None,
):
    """The encoder with params restored from ``run_dir`` at ``step`` (default the latest; or a
    seeded random init), sharded, able to embed whole images of ``modalities``
    (:func:`embed_config`)."""
    cfg = embed_config(cfg, modalities)
    graphdef, abstract_params, p_shard = st.abstract_params(cfg, mesh)
    if random_init:
        params = st.init_params(cfg, p_shard)
    else:
        params = checkpoint.load_params(
            run_dir, checkpoint.abstract_of(abstract_params, p_shard), step=step
        )
    return nnx.merge(graphdef, params).encoder


def patient_groups(records) -> np.ndarray:
    """``[N]`` int32: rows of one patient share a number (order of first appearance), so that
    the probe's hold-outs never split a patient, without writing the patient id itself. A record
    without a patient is its own group."""
    index: dict = {}
    return np.array(
        [index.setdefault(r.patient or ("", r.id), len(index)) for r in records], np.int32
    )


def _labels(rec, findings) -> np.ndarray:
    return np.array(
        [float(rec.labels[f]) if rec.labels.get(f) is not None else np.nan for f in findings],
        np.float32,
    )


def embed(
    cfg,
    records,
    encoder,
    out: str,
    mesh,
    *,
    batch_size: int = 16,
    progress: bool = True,
    findings=None,
    forward=None,
) -> dict:
    """Embeds ``records`` (skipping those already in ``out.partial/``) and writes ``out``.

    ``findings``: the label columns (default: the manifest's, ``records.findings`` of
    :func:`load_manifest`'s result, else the paper's five). ``forward``: a jitted ``batch ->
    [R, V, D]`` used instead of ``encoder`` (a caller embedding repeatedly keeps one compile).

    With several processes each embeds every ``P``-th image (in lockstep: the same number of
    batches everywhere) into its own chunk files; process 0 then merges them. ``out`` must be on
    a file system all processes see (as a cluster's run folder is).
    """
    findings = tuple(findings or getattr(records, "findings", LABELS))
    proc, nproc = jax.process_index(), jax.process_count()
    partial = out + ".partial"
    os.makedirs(partial, exist_ok=True)
    done = set()
    for f in sorted(glob.glob(os.path.join(partial, "chunk_*.npz"))):
        done.update(np.load(f)["ids"].tolist())
    todo = [r for r in records if r.id not in done]
    rules = shd.rules_dict(cfg.mesh.rules)
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.rows_multiple_of = shd.rows_per_process_multiple(mesh, rules, nproc)
    batch_sh = shd.batch_shardings(mesh, rules)

    forward = forward or jax.jit(lambda batch: encoder(batch))

    if todo:
        it = pipeline.make_eval_iterator(
            data_cfg, todo, batch_size=batch_size, process_index=proc, process_count=nproc
        )
        bar = None
        if progress and sys.stderr.isatty() and proc == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="img", desc="embed")
        n_chunks = len(glob.glob(os.path.join(partial, f"chunk_p{proc:03d}_*.npz")))
        with axis_rules(mesh, rules):
            for batch, ids in it:
                emb = forward(shd.global_batch(batch, batch_sh))
                emb = (
                    np.asarray(
                        multihost_utils.global_array_to_host_local_array(emb, mesh, batch_sh.spec)
                    )
                    if nproc > 1
                    else np.asarray(emb)
                )
                if ids:
                    vecs = images.gather(batch, emb, len(ids))
                    name = f"chunk_p{proc:03d}_{n_chunks:06d}"
                    tmp = os.path.join(partial, name + ".tmp.npz")
                    np.savez(tmp, ids=np.asarray(ids, dtype=str), embeddings=vecs)
                    os.replace(tmp, os.path.join(partial, name + ".npz"))  # atomic
                    n_chunks += 1
                if bar:
                    bar.update(len(ids) * nproc)
        if bar:
            bar.close()
    if nproc > 1:
        multihost_utils.sync_global_devices("mmv-embed: chunks written")
    vecs = {}
    for f in sorted(glob.glob(os.path.join(partial, "chunk_*.npz"))):
        z = np.load(f)
        vecs.update(zip(z["ids"].tolist(), z["embeddings"]))
    kept = [r for r in records if r.id in vecs]  # unreadable images were skipped and logged
    arrays = dict(
        ids=np.array([r.id for r in kept]),
        embeddings=np.stack([vecs[r.id] for r in kept]),
        modality=np.array([r.modality for r in kept]),
        dataset=np.array([r.dataset for r in kept]),
        split=np.array([r.split for r in kept]),
        labels=np.stack([_labels(r, findings) for r in kept]).reshape(len(kept), len(findings)),
        findings=np.array(findings),
        group=patient_groups(kept),
    )
    if nproc > 1:  # every process has read every chunk before process 0 removes them
        multihost_utils.sync_global_devices("mmv-embed: chunks read")
    if proc == 0:
        save_embeddings(out, **arrays)
        for f in glob.glob(os.path.join(partial, "*")):
            os.remove(f)
        os.rmdir(partial)
    return arrays


def _resolve_checkpoint(path: str, step: int | None):
    """``api.resolve_checkpoint`` of ``--checkpoint`` and ``--step``, after checking that the
    path is a folder; raises ``ValueError`` naming them."""
    from mmv_jax.api import resolve_checkpoint

    if not os.path.isdir(path):
        raise ValueError(
            f"--checkpoint {path!r} is not a folder (a run folder of mmv-train or "
            "RUN/checkpoints/N)"
        )
    return resolve_checkpoint(path, step)


def main(argv=None) -> int:
    ap = cli.ArgumentParser("mmv-embed", description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_args(ap)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--config", help="config file (default: the run's config.json)")
    ap.add_argument(
        "--splits", "--split", nargs="*", dest="splits", help="only these splits (default: all)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--random-init", action="store_true", help="untrained encoder baseline")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.config and not os.path.isfile(args.config):
        ap.error(f"--config {args.config!r} not found")
    if argv is None:
        reexec_with_hugepages()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run, ckpt_dir, step = _resolve_checkpoint(args.checkpoint, args.step)
        records = load_manifest(args.manifest, splits=args.splits)
        if not records:
            raise ValueError(
                f"{args.manifest}: no records"
                + (f" in split(s) {args.splits}" if args.splits else "")
            )
        cfg = load_run_config(run, args.config)
    except (ValueError, ManifestError) as e:
        return cli.fail("mmv-embed", e)
    distributed.initialize()  # several processes: MMV_COORDINATOR etc., SLURM or a TPU slice
    mesh = shd.make_mesh((-1, 1, 1))
    try:
        encoder = build_encoder(
            cfg,
            ckpt_dir,
            mesh,
            random_init=args.random_init,
            modalities={r.modality for r in records},
            step=step,
        )
    except FileNotFoundError:
        return cli.fail(
            "mmv-embed",
            f"--checkpoint {args.checkpoint!r}: no Orbax checkpoint"
            f"{'' if step is None else f' at step {step}'} there",
        )
    except checkpoint.CheckpointError as e:
        return cli.fail("mmv-embed", f"--checkpoint {args.checkpoint!r}: {e}")
    arrays = embed(cfg, records, encoder, args.out, mesh, batch_size=args.batch_size)
    if jax.process_index() == 0:
        print(f"mmv-embed: {len(arrays['ids'])} embeddings -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
