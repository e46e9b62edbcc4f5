"""The Python API: load a trained encoder and embed images.

    import mmv_jax
    enc = mmv_jax.load_encoder("runs/stage3")            # run, run/checkpoints/N or mmv-export folder
    z = enc.embed(["a.dcm", "b.png", "ct.nii.gz"])       # [3, D] numpy, as mmv-embed computes them
    z = enc.embed(ct_hu, spacing=(1.5, 0.7, 0.7))        # arrays: [H, W] X-ray, [Z, H, W] CT in HU
    fmap = enc.patch_features("a.dcm")                   # [gy, gx, D] (a CT: [gz, gy, gx, D])

Inputs go through the training preprocessing, one whole-image view each, the eval packer and
the jitted encoder sharded over this process's devices, exactly as ``mmv-embed`` does
(:mod:`mmv_jax.images`, :mod:`mmv_jax.eval.embed`), so the numbers are the same.
"""

from __future__ import annotations

import os

import numpy as np

from mmv_jax import images as im
from mmv_jax.data import packing

__all__ = ["Encoder", "load_encoder"]


class Encoder:
    """A frozen encoder and the preprocessing it was trained with (from :func:`load_encoder`).

    ``cfg``: the run's config (``cfg.data`` gives the preprocessing and the packing);
    ``source``/``step``: where the weights came from; ``dim``: the embedding width D.
    """

    def __init__(self, cfg, module, mesh, *, source: str, step: int | None):
        import jax
        from flax import nnx

        from mmv_jax.train import sharding as shd

        self.cfg, self.source, self.step, self.mesh = cfg, source, step, mesh
        self.dim = int(module.cfg.width)
        self.preprocessing = im.Preprocessing.from_data_config(cfg.data)
        self._rules = shd.rules_dict(cfg.mesh.rules)
        self._data = cfg.data.copy_and_resolve_references()
        self._data.rows_multiple_of = shd.rows_per_process_multiple(mesh, self._rules, 1)
        self._batch_sh = shd.batch_shardings(mesh, self._rules)
        graphdef, state = nnx.split(module)
        self._state = state
        # the weights are arguments, not constants baked into the compiled program
        self._pooled = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
        self._tokens = jax.jit(lambda s, b: nnx.merge(graphdef, s).tokens(b))

    def __repr__(self):
        return (
            f"Encoder({self.cfg.model.variant}, dim={self.dim}, step={self.step}, "
            f"source={self.source!r})"
        )

    def _run(self, fn, views, has_3d: bool, batch_size: int):
        from mmv_jax.data import pipeline
        from mmv_jax.model.axes import axis_rules
        from mmv_jax.train import sharding as shd

        rows, s, slots, pd = pipeline.eval_batch_shape(self._data, batch_size, has_3d)
        batch = packing.pack_into(views, rows, s, slots, pd)
        with axis_rules(self.mesh, self._rules):
            out = fn(self._state, shd.global_batch(batch, self._batch_sh))
        return batch, np.asarray(out, np.float32)

    def embed(self, images, *, spacing=None, modality=None, batch_size: int = 16) -> np.ndarray:
        """``images``: one or a list of file paths and/or arrays (``[H, W]`` X-ray, ``[Z, H, W]``
        CT in HU, numpy or torch). ``spacing``: mm, ``(y, x)`` or ``(z, y, x)``, one for all or
        a list (``None`` entries: the file's own; required for CT arrays). ``modality``:
        ``"cxr"``/``"ct"`` (one or a list; default: 2D is an X-ray, 3D a CT).
        -> ``[N, D]`` float32, one row per input in order. A bad input raises
        :class:`~mmv_jax.data.readers.ImageReadError` naming it (nothing is skipped)."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prepared = im.prepare_all(images, self.preprocessing, spacing=spacing, modality=modality)
        out = np.zeros((len(prepared), self.dim), np.float32)
        for start in range(0, len(prepared), int(batch_size)):
            chunk = prepared[start : start + int(batch_size)]
            views = im.views_of(chunk)
            batch, pooled = self._run(
                self._pooled, views, any(p.modality == "ct" for p in chunk), int(batch_size)
            )
            out[start : start + len(chunk)] = im.gather(batch, pooled, len(chunk))
        return out

    def patch_features(self, image, *, spacing=None, modality=None) -> np.ndarray:
        """Final-norm patch tokens of one image's whole view as a feature map: ``[gy, gx, D]``
        for an X-ray, ``[gz, gy, gx, D]`` for a CT (grid of P=14 patches of the preprocessed
        image; ``embed`` is their mean)."""
        if not im._is_single(image):
            raise ValueError("patch_features takes one image (a path or an array)")
        [p] = im.prepare_all(image, self.preprocessing, spacing=spacing, modality=modality)
        batch, tokens = self._run(self._tokens, im.views_of([p]), p.modality == "ct", 1)
        return im.token_grid(batch, tokens, 0)


def _step_folder(path: str):
    """``run/checkpoints/N`` -> (run folder, checkpoints folder, N), else None."""
    name, parent = os.path.basename(os.path.normpath(path)), os.path.dirname(os.path.normpath(path))
    if name.isdigit() and os.path.isdir(path):
        return os.path.dirname(parent), parent, int(name)
    return None


def load_encoder(
    path, step: int | None = None, *, config: str | None = None, dtype: str | None = None
) -> Encoder:
    """The encoder of a run folder (``mmv-train --workdir``), one of its checkpoints
    (``run/checkpoints/N``, or ``step=N``; default the latest) or an ``mmv-export`` folder.

    ``config``: a config file to use instead of the run's ``config.json``; ``dtype``: compute
    dtype (``"float32"``/``"bfloat16"``; default the run's). Uses all of this process's devices.
    Raises ``FileNotFoundError``/``ValueError`` naming ``path`` when there is nothing to load.
    """
    import jax

    from mmv_jax import export
    from mmv_jax.eval import embed
    from mmv_jax.train import sharding as shd

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"load_encoder: {path!r} is not a folder (a run, a checkpoint or an mmv-export folder)"
        )
    mesh = shd.make_mesh((-1, 1, 1), jax.local_devices())
    if export.is_export(path):
        if step is not None:
            raise ValueError(
                f"load_encoder: {path!r} is an export (one set of weights); "
                "step applies to run folders"
            )
        cfg, params = export.read_export(path)
        if dtype:
            cfg.model.dtype = dtype
        return Encoder(
            cfg,
            export.encoder_from_params(cfg, params, mesh),
            mesh,
            source=os.path.abspath(path),
            step=cfg.get("export_step"),
        )
    run, ckpt_dir, step = resolve_checkpoint(path, step, who="load_encoder:")
    try:
        cfg = embed.load_run_config(run, config)
    except ValueError:
        raise ValueError(
            f"load_encoder: no config.json in {run!r} (nor is {path!r} an "
            "mmv-export folder); pass config='configs/X.py'"
        ) from None
    if dtype:
        cfg.model.dtype = dtype
    if step is None:
        step = export.latest_step(ckpt_dir)
        if step is None:
            raise FileNotFoundError(f"load_encoder: no checkpoint in {ckpt_dir!r}")
    params = export.load_jax_params(ckpt_dir, step, what="load_encoder")
    return Encoder(
        cfg,
        export.encoder_from_params(cfg, params["encoder"], mesh),
        mesh,
        source=os.path.abspath(path),
        step=step,
    )


def resolve_checkpoint(path: str, step: int | None = None, *, who: str = "--checkpoint"):
    """(run folder, CheckpointManager folder, step) for a run folder, its ``checkpoints`` folder
    or one step folder ``run/checkpoints/N``. ``step`` (None: the latest, looked up by the
    caller) must agree with a step folder's N; ``ValueError`` naming ``who`` otherwise."""
    found = _step_folder(path)
    if found is not None:
        run, ckpt_dir, folder_step = found
        if step is not None and step != folder_step:
            raise ValueError(f"{who} {path!r} is step {folder_step}, but step {step} was asked for")
        return run, ckpt_dir, folder_step
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path, os.path.join(path, "checkpoints"), step
    if os.path.exists(os.path.join(os.path.dirname(os.path.normpath(path)), "config.json")):
        return os.path.dirname(os.path.normpath(path)), path, step
    return path, path, step
