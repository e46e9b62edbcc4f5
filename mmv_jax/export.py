"""``mmv-export``: a trained encoder as a self-describing folder, for JAX and PyTorch.

  mmv-export --checkpoint runs/stage3 [--step N] --out exports/stage3

The folder holds:

- ``config.json``: ``format`` (``"mmv_jax-encoder"``), ``format_version``; ``model``
  (variant, width, depth, heads, mlp_ratio, patch_size, ln_eps, ``rope``: alpha, base,
  pairs_per_axis; pooling); ``preprocessing`` (long sides 2D/3D, resize rule, CT window and
  intensity scaling); ``weights`` (file, naming, dtype); ``step``; and ``training_config``, the
  run's whole config (so that ``mmv_jax.load_encoder`` packs and computes exactly as the run).
- ``model.safetensors``: the encoder's weights (no projector), float32, timm-style names
  (``patch_embed.proj.weight``, ``blocks.N.attn.qkv.weight`` ...; :mod:`mmv_jax.torch.names`).
- ``README.md``: a model card (what it is, how to load it, its preprocessing).

``mmv_jax.load_encoder(DIR)`` and ``mmv_jax.torch.load_encoder(DIR)`` read it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings

import numpy as np

from mmv_jax import cli
from mmv_jax.batch import ALPHA, PATCH
from mmv_jax.torch.names import ConversionError, flatten, jax_to_torch, torch_to_jax

log = logging.getLogger(__name__)

FORMAT = "mmv_jax-encoder"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"


class ExportError(ValueError):
    """Bad input to the export (the message names the argument or file)."""


# --------------------------------------------------------------------------- reading checkpoints


def latest_step(ckpt_dir: str) -> int | None:
    import orbax.checkpoint as ocp

    if not os.path.isdir(ckpt_dir):
        return None
    mgr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
    try:
        return mgr.latest_step()
    finally:
        mgr.close()


def load_jax_params(path: str, step: int | None = None, what: str = "--in") -> dict:
    """Params pure dict (numpy, as saved; no config needed) of a run folder, its
    ``checkpoints`` folder (a CheckpointManager folder) or one step folder ``.../N``; ``step``
    default the latest. Raises :class:`ConversionError` naming ``what`` and the path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    name = os.path.basename(path)
    candidates = [(os.path.join(path, "checkpoints"), step), (path, step)]
    if name.isdigit():  # a step folder: its CheckpointManager is the parent
        if step is not None and step != int(name):
            raise ConversionError(f"{what} {path!r} is step {name}, but --step {step} was given")
        candidates = [(os.path.dirname(path), int(name))]
    for directory, s in candidates:
        if not os.path.isdir(directory):
            continue
        mgr = ocp.CheckpointManager(directory)
        try:
            steps = mgr.all_steps()
            s = mgr.latest_step() if s is None else s
            if s is None:
                continue
            if s not in steps:
                raise ConversionError(
                    f"{what} {path!r}: no step {s} (steps there: {sorted(steps) or 'none'})"
                )
            items = {"state": _params_only(os.path.join(directory, str(s), "state"))}
            if os.path.isdir(os.path.join(directory, str(s), "checksums")):
                items["checksums"] = ocp.args.JsonRestore()
            with warnings.catch_warnings():  # "sharding info not provided": host arrays wanted
                warnings.simplefilter("ignore", UserWarning)
                try:
                    restored = mgr.restore(s, args=ocp.args.Composite(**items))
                except Exception as e:  # damaged files: name the checkpoint, not a traceback
                    raise ConversionError(
                        f"{what} {path!r}: checkpoint step {s} cannot be read ({type(e).__name__})"
                    ) from None
        finally:
            mgr.close()
        params = _strip_value(restored["state"]["params"])
        if "checksums" in restored:
            _verify(params, restored["checksums"], f"{what} {path!r}: checkpoint step {s}")
        return params
    raise ConversionError(
        f"{what} {path!r}: no Orbax checkpoint found there (nor in its checkpoints/)"
    )


def _verify(params: dict, saved: dict, where: str) -> None:
    """Checks ``params`` against the checksums the trainer saved beside them
    (:func:`mmv_jax.train.checkpoint.checksums`, keyed by the TrainState's leaf paths)."""
    from mmv_jax.train.checkpoint import checksums

    got = {
        ".params" + k[len("['params']") :] + ".value": v
        for k, v in checksums({"params": params}).items()
    }
    common = [k for k in got if k in saved]
    bad = [k for k in common if got[k] != saved[k]]
    if bad:
        raise ConversionError(
            f"{where} is corrupted: {len(bad)} arrays differ from their "
            f"checksums (first: {bad[0]}); use another step"
        )
    if not common and any(k.startswith(".params") for k in saved):
        log.warning("%s: params checksums not comparable (layout changed); not verified", where)


def _params_only(state_dir: str):
    """Restore args reading only the params, as numpy (the optimizer state, twice their size,
    stays on disk); the whole state where the saved metadata is not the expected layout."""
    import jax
    import orbax.checkpoint as ocp

    try:
        meta = ocp.PyTreeCheckpointer().metadata(state_dir)
        tree = getattr(meta, "item_metadata", meta)
        item = {"params": getattr(tree, "tree", tree)["params"]}
    except (OSError, KeyError, TypeError, AttributeError, ValueError):
        return ocp.args.PyTreeRestore()
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    return ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)


def _strip_value(tree):
    """Orbax stores nnx Params as ``{..., name: {"value": array}}``; list indices as strings."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return np.asarray(tree["value"])
        return {
            (int(k) if isinstance(k, str) and k.isdigit() else k): _strip_value(v)
            for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return {i: _strip_value(v) for i, v in enumerate(tree)}
    return np.asarray(tree)


# --------------------------------------------------------------------------- the folder


def export_config(cfg, step: int | None) -> dict:
    """``config.json`` of an export of a run with config ``cfg``."""
    from mmv_jax.train import state as st

    enc = st.encoder_config_from(cfg)
    data = cfg.data
    width, level = (float(x) for x in data.ct_window)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "architecture": "SparseMedicalViT",
            "variant": cfg.model.variant,
            "width": enc.width,
            "depth": enc.depth,
            "heads": enc.heads,
            "mlp_ratio": enc.mlp_ratio,
            "patch_size": enc.patch,
            "ln_eps": enc.ln_eps,
            "rope": {"alpha": ALPHA, "base": enc.rope_base, "pairs_per_axis": enc.head_dim // 6},
            "pooling": "mean of each view's final-LayerNorm tokens",
        },
        "preprocessing": {
            "long_side_2d": int(data.views.long_side_2d),
            "long_side_3d": int(data.views.long_side_3d),
            "resize": "longest physical side to long_side voxels, isotropic, aspect kept "
            "(area-averaging shrink, linear interpolation); whole image centre-"
            "trimmed to a multiple of patch_size",
            "ct_window": {"width": width, "level": level},
            "intensity": {
                "cxr": "min-max to [-1, 1]",
                "ct": "HU window (level - width/2 .. level + width/2) to [-1, 1], clipped",
            },
            "max_image_voxels": int(data.get("max_image_voxels", 0) or 0) or None,
        },
        "weights": {"file": WEIGHTS, "names": "timm", "dtype": "float32", "projector": False},
        "step": step,
        "training_config": json.loads(cfg.to_json_best_effort()),
    }


def write_export(cfg, encoder_params: dict, out: str, step: int | None) -> dict:
    """Writes the folder from the encoder's params (JAX pure dict, numpy)."""
    from safetensors.numpy import save_file

    conf = export_config(cfg, step)
    state = jax_to_torch({"encoder": encoder_params})
    os.makedirs(out, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
        os.path.join(out, WEIGHTS),
        metadata={"format": FORMAT},
    )
    conf["weights"]["tensors"] = len(state)
    conf["weights"]["parameters"] = int(sum(v.size for v in state.values()))
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(conf, f, indent=2)
    with open(os.path.join(out, CARD), "w") as f:
        f.write(model_card(conf))
    return conf


def model_card(conf: dict) -> str:
    m, p = conf["model"], conf["preprocessing"]
    w = p["ct_window"]
    return f"""# MultiMedVision encoder ({m["variant"]}, {m["depth"]} blocks), mmv_jax export

A SparseMedicalViT that embeds 2D chest X-rays and 3D chest CT with one set of weights
(3D RoPE, patch {m["patch_size"]}, width {m["width"]}, {m["heads"]} heads), pretrained
self-supervised with LeJEPA by `mmv_jax` (step {conf["step"]}). One embedding per image:
{m["pooling"]}, {m["width"]} numbers. {conf["weights"]["parameters"]:,} parameters.

## Use

```python
import mmv_jax                                  # JAX
enc = mmv_jax.load_encoder("THIS_FOLDER")
z = enc.embed(["xray.dcm", "ct.nii.gz"])        # [2, {m["width"]}] numpy

from mmv_jax.torch import load_encoder          # PyTorch: pip install 'mmv_jax[torch]'
enc = load_encoder("THIS_FOLDER")
z = enc.embed([xray, ct_hu], spacing=[None, (1.5, 0.7, 0.7)])  # [2, {m["width"]}] torch
```

## Preprocessing (applied by both loaders; feed raw images)

- X-ray `[H, W]`: longest physical side resized to {p["long_side_2d"]} pixels, min-max to [-1, 1].
- CT `[Z, H, W]` in HU (axis 0 inferior to superior), with its voxel spacing in mm: longest
  physical side to {p["long_side_3d"]} voxels, isotropic; window width {w["width"]:g}, level
  {w["level"]:g} to [-1, 1], clipped.
- The whole image is one view, centre-trimmed to a multiple of {m["patch_size"]} pixels.

## Files

`config.json` (architecture, preprocessing, the training config), `model.safetensors`
(float32, timm-style names, encoder only).

## Limits

Research use only; not a medical device. Pretrained without labels: evaluate with a probe on
your own labelled data before relying on it.
"""


def is_export(path: str) -> bool:
    conf = os.path.join(path, CONFIG)
    if not (os.path.isfile(conf) and os.path.isfile(os.path.join(path, WEIGHTS))):
        return False
    try:
        with open(conf) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(folder: str) -> dict:
    """``config.json`` of an export folder, checked. Raises :class:`ExportError` naming it."""
    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable config.json ({type(e).__name__})") from None
    if not isinstance(conf, dict) or conf.get("format") != FORMAT:
        raise ExportError(f"{path}: not an mmv-export config (format is not {FORMAT!r})")
    if int(conf.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {conf['format_version']} is newer than this "
            f"mmv_jax reads ({FORMAT_VERSION}); upgrade mmv_jax"
        )
    m = conf["model"]
    if int(m["patch_size"]) != PATCH or not math.isclose(float(m["rope"]["alpha"]), ALPHA):
        raise ExportError(
            f"{path}: patch_size {m['patch_size']} / RoPE alpha {m['rope']['alpha']} "
            f"differ from this mmv_jax's data pipeline ({PATCH} / {ALPHA:g})"
        )
    return conf


def read_weights(folder: str) -> dict:
    """``model.safetensors`` -> timm name -> float32 numpy array."""
    from safetensors.numpy import load_file

    path = os.path.join(folder, WEIGHTS)
    try:
        return {k: v.astype(np.float32) for k, v in load_file(path).items()}
    except Exception as e:
        raise ExportError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None


def run_config_of(conf: dict):
    """The ``ml_collections`` run config an export stands for: its training config with the
    recorded model and preprocessing fields applied (those are authoritative)."""
    import ml_collections

    if conf.get("training_config"):
        cfg = ml_collections.ConfigDict(conf["training_config"])
    else:
        import configs.base as base

        cfg = base.get_config()
    m, p = conf["model"], conf["preprocessing"]
    cfg.model.variant = m["variant"]
    cfg.model.depth = int(m["depth"])
    cfg.data.views.long_side_2d = int(p["long_side_2d"])
    cfg.data.views.long_side_3d = int(p["long_side_3d"])
    cfg.data.ct_window = (float(p["ct_window"]["width"]), float(p["ct_window"]["level"]))
    if p.get("max_image_voxels"):
        cfg.data.max_image_voxels = int(p["max_image_voxels"])
    cfg.export_step = conf.get("step")
    return cfg


def read_export(folder: str):
    """``(run config, encoder params as a JAX pure dict)`` of an export folder; the tensors are
    checked by name and shape against the config's encoder."""
    from flax import nnx

    from mmv_jax.model.encoder import Encoder
    from mmv_jax.train import state as st

    conf = read_config(folder)
    cfg = run_config_of(conf)
    abstract = nnx.to_pure_dict(
        nnx.state(
            nnx.eval_shape(lambda: Encoder(st.encoder_config_from(cfg), rngs=nnx.Rngs(0))),
            nnx.Param,
        )
    )
    try:
        params, _ = torch_to_jax(read_weights(folder), {"encoder": abstract})
    except ConversionError as e:
        raise ExportError(
            f"{os.path.join(folder, WEIGHTS)} does not match config.json: {e}"
        ) from None
    return cfg, params["encoder"]


def encoder_from_params(cfg, params: dict, mesh):
    """An :class:`~mmv_jax.model.encoder.Encoder` built as ``mmv-embed`` builds it
    (:func:`mmv_jax.eval.embed.embed_config`: attention bound for whole images of both
    modalities) holding ``params`` (JAX pure dict, numpy), sharded over ``mesh``."""
    import jax
    from flax import nnx

    from mmv_jax.eval.embed import embed_config
    from mmv_jax.model.encoder import Encoder
    from mmv_jax.train import sharding as shd, state as st

    cfg = embed_config(cfg)
    abstract = nnx.eval_shape(lambda: Encoder(st.encoder_config_from(cfg), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = shd.param_shardings(state, mesh, shd.rules_dict(cfg.mesh.rules))
    want = {k: tuple(v.shape) for k, v in flatten(nnx.to_pure_dict(state)).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    if want != got:
        bad = sorted("/".join(map(str, k)) for k in set(want) ^ set(got)) or sorted(
            "/".join(map(str, k)) for k in want if want[k] != got.get(k)
        )
        raise ExportError(
            f"the weights do not match config.model ({cfg.model.variant}, depth "
            f"{cfg.model.depth}): {', '.join(bad[:8])}"
        )
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: np.asarray(x, np.float32), params))
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def export(
    checkpoint: str, out: str, *, step: int | None = None, config: str | None = None
) -> dict:
    """Exports the encoder of ``checkpoint`` (a run folder or ``run/checkpoints/N``) to ``out``
    (a new or empty folder); returns the written ``config.json``."""
    # the mistakes a user makes most are checked before JAX is imported (fast, and quiet)
    if not os.path.isdir(checkpoint):
        raise ExportError(f"--checkpoint {checkpoint!r}: no such folder")
    if os.path.isdir(out) and os.listdir(out):
        raise ExportError(f"--out {out!r} is not empty; choose a new folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out!r} is a file; choose a new folder")
    from mmv_jax.api import resolve_checkpoint

    try:
        run, ckpt_dir, step = resolve_checkpoint(checkpoint, step)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if config is not None and not os.path.isfile(config):
        raise ExportError(f"--config {config!r}: no such file")
    from mmv_jax.eval.embed import load_run_config

    try:
        cfg = load_run_config(run, config)
    except ValueError:
        raise ExportError(
            f"--checkpoint {checkpoint!r}: no config.json in {run!r}; pass --config configs/X.py"
        ) from None
    if step is None:
        step = latest_step(ckpt_dir)
        if step is None:
            raise ExportError(f"--checkpoint {checkpoint!r}: no Orbax checkpoint found there")
    try:
        params = load_jax_params(ckpt_dir, step, what="--checkpoint")
    except ConversionError as e:
        raise ExportError(str(e)) from None
    return write_export(cfg, params["encoder"], out, step)


@cli.command("mmv-export", ExportError)
def main(argv=None) -> int:
    ap = cli.ArgumentParser("mmv-export", description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_args(ap)
    ap.add_argument("--out", required=True, help="new (or empty) folder for the export")
    ap.add_argument("--config", help="config file (default: the run's config.json)")
    args = ap.parse_args(argv)
    conf = export(args.checkpoint, args.out, step=args.step, config=args.config)
    print(
        f"mmv-export: {conf['model']['variant']} encoder, step {conf['step']}, "
        f"{conf['weights']['tensors']} tensors -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
