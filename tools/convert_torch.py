"""PyTorch state_dict (.safetensors / .pt / Lightning .ckpt) <-> mmv_jax Orbax checkpoint.

  python tools/convert_torch.py torch2jax --in model.safetensors --config configs/demo.py --out DIR \
      [--config.model.depth=2 ...] [--allow-missing 'projector.*'] [--ignore 'head.*'] [--prefix model.]
  python tools/convert_torch.py jax2torch --in RUN_DIR --out model.safetensors [--step N]

``torch2jax`` writes an Orbax CheckpointManager folder (item ``state`` = TrainState at step 0,
fresh optimizer) that ``--config.init_from=DIR`` accepts. ``jax2torch`` reads a run folder (its
``checkpoints``), a CheckpointManager folder, and writes the timm-style state_dict that
``mmv_jax.torch`` loads (``.safetensors`` preferred; ``.pt`` = ``torch.save``).

Checkpoints are untrusted input: ``.pt`` / ``.ckpt`` load with ``torch.load(weights_only=True)``
(no pickled code runs). A Lightning checkpoint's nested ``state_dict`` is used and its key prefix
(``model.``, ``module.``, ``_orig_mod.`` ...) stripped. Every PyTorch tensor must map to a
parameter and every parameter must be given, with the right shape; anything else is reported by
name and the conversion refused, unless ``--allow-missing`` / ``--ignore`` (fnmatch patterns on
PyTorch names) say so. Missing parameters that are allowed keep the config's fresh init.

Layouts (JAX <- PyTorch): Dense kernel ``[in, out]`` <- Linear weight ``[out, in]``; qkv
``[d, 3, H, Dh]`` <- ``qkv.weight [3d, d]`` (output index (t, h, k)); proj ``[H, Dh, d]`` <-
``proj.weight [d, d]``; patch kernel ``[P^3, d]`` <- Conv3d weight ``[d, 1, P, P, P]``;
LayerNorm scale/bias <- weight/bias.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from collections import OrderedDict

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, _ROOT)

from mmv_jax.export import load_jax_params  # noqa: E402
from mmv_jax.torch.names import (  # noqa: E402
    ConversionError,
    flatten,
    jax_to_torch,
    name_map,
    torch_to_jax,
    unflatten,
)

# --------------------------------------------------------------------------- PyTorch files

_NESTED = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def load_torch_state(path: str) -> OrderedDict[str, np.ndarray]:
    """A checkpoint file -> flat name -> float32 numpy array (no pickled code is run)."""
    if not os.path.isfile(path):
        raise ConversionError(f"--in {path!r}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return OrderedDict((k, v.astype(np.float32)) for k, v in load_file(path).items())
        except Exception as e:  # bf16 tensors: numpy has no bfloat16; go through torch
            from safetensors.torch import load_file as load_torch

            try:
                return OrderedDict((k, v.float().numpy()) for k, v in load_torch(path).items())
            except Exception:
                raise ConversionError(
                    f"--in {path!r}: not a readable safetensors file ({e})"
                ) from None
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"--in {path!r}: refusing to load: the file holds pickled objects beyond tensors and "
            f"containers, and untrusted pickles may run code (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]}). Save `model.state_dict()` with torch.save, or better as "
            f".safetensors, and convert that."
        ) from None
    except Exception as e:
        raise ConversionError(f"--in {path!r}: not a readable PyTorch checkpoint ({e})") from None
    return _tensor_dict(obj, path)


def _tensor_dict(obj, path) -> OrderedDict[str, np.ndarray]:
    import torch

    is_t = lambda v: isinstance(v, torch.Tensor)
    for _ in range(4):  # Lightning {"state_dict": ...}, {"model": ...}, DDP wrappers ...
        if isinstance(obj, dict) and obj and all(is_t(v) for v in obj.values()):
            break
        inner = next(
            (obj[k] for k in _NESTED if isinstance(obj, dict) and isinstance(obj.get(k), dict)),
            None,
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ConversionError(
            f"--in {path!r}: expected a state_dict (name -> tensor), got {type(obj).__name__}"
        )
    tensors = OrderedDict((k, v.detach().float().numpy()) for k, v in obj.items() if is_t(v))
    if not tensors:
        raise ConversionError(f"--in {path!r}: no tensors found (keys: {list(obj)[:10]})")
    return tensors


def strip_prefix(state: dict, expected, prefix: str | None = None) -> OrderedDict[str, np.ndarray]:
    """Drops the key prefix (``model.``, ``module.``, ``model._orig_mod.`` ...) under which most
    keys become expected names (or the given ``prefix``); other keys are left as they are."""
    expected = set(expected)
    if prefix is None:
        votes: dict[str, int] = {}
        for k in state:
            for e in expected:
                if k.endswith(e) and (len(k) == len(e) or k[-len(e) - 1] == "."):
                    votes[k[: len(k) - len(e)]] = votes.get(k[: len(k) - len(e)], 0) + 1
        prefix = max(votes, key=lambda p: (votes[p], -len(p))) if votes else ""
    return OrderedDict(
        (k[len(prefix) :] if prefix and k.startswith(prefix) else k, v) for k, v in state.items()
    )


def save_torch_state(state: dict, path: str) -> None:
    import torch

    tensors = OrderedDict(
        (k, torch.from_numpy(np.array(v, dtype=np.float32))) for k, v in state.items()
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, path)
    else:
        torch.save(tensors, path)


# --------------------------------------------------------------------------- Orbax side


def load_config(path: str, overrides=()):
    """A python config file's ``get_config()`` with ``--config.a.b=value`` overrides applied."""
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    spec = importlib.util.spec_from_file_location("_convert_config", path)
    if spec is None or not os.path.isfile(path):
        raise ConversionError(f"--config {path!r}: no such config file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    for item in overrides:
        key, _, raw = item[len("--config.") :].partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def _single_device_state(cfg):
    import jax

    from mmv_jax.train import sharding as shd, state as st

    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    tx = st.make_optimizer(cfg)
    return st.create(cfg, mesh, tx)


def save_jax_checkpoint(params: dict, cfg, out_dir: str, created=None) -> str:
    """Writes ``params`` (pure dict) as a step-0 TrainState (fresh optimizer) under ``out_dir``;
    ``created``: the config's ``(graphdef, state, shardings)`` when already built."""
    import jax
    from flax import nnx

    from mmv_jax.train.checkpoint import Checkpointer

    _, state, shardings = created or _single_device_state(cfg)
    p = state.params
    nnx.replace_by_pure_dict(p, jax.tree.map(np.asarray, params))
    state = state._replace(params=jax.device_put(p, shardings.params))
    ckpt = Checkpointer(out_dir, keep=1, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            raise ConversionError(
                f"--out {out_dir!r} already holds a checkpoint; choose an empty folder"
            )
        ckpt.save(0, state, force=True)
    finally:
        ckpt.close()
    return ckpt.directory


def abstract_params(cfg) -> dict:
    """The config's param shapes (pure dict of ShapeDtypeStruct), without computing anything."""
    from flax import nnx

    from mmv_jax.train import state as st

    return nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: st.build_model(cfg, seed=cfg.seed)), nnx.Param)
    )


def fresh_params(cfg, created=None) -> dict:
    """The config's freshly initialised params as a pure dict of numpy arrays."""
    import jax
    from flax import nnx

    _, state, _ = created or _single_device_state(cfg)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    ap = argparse.ArgumentParser("convert_torch.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t2j = sub.add_parser("torch2jax", help="PyTorch state_dict -> Orbax checkpoint folder")
    t2j.add_argument("--in", dest="src", required=True)
    t2j.add_argument("--config", required=True, help="python config file (model shape, seed)")
    t2j.add_argument("--out", required=True, help="new folder for the Orbax checkpoint")
    t2j.add_argument(
        "--allow-missing",
        action="append",
        default=[],
        metavar="PATTERN",
        help="PyTorch names (fnmatch) that may be missing; they keep the fresh init",
    )
    t2j.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="PyTorch tensors (fnmatch) to drop, e.g. 'head.*'",
    )
    t2j.add_argument("--prefix", default=None, help="key prefix to strip (default: detected)")
    j2t = sub.add_parser("jax2torch", help="Orbax run/checkpoint folder -> PyTorch state_dict")
    j2t.add_argument("--in", dest="src", required=True)
    j2t.add_argument("--out", required=True, help=".safetensors (preferred) or .pt")
    j2t.add_argument("--step", type=int, default=None)
    args = ap.parse_args(argv)
    if overrides and args.cmd != "torch2jax":
        ap.error("--config.* overrides only apply to torch2jax")
    try:
        if args.cmd == "torch2jax":
            cfg = load_config(args.config, overrides)
            if os.path.isdir(args.out) and os.listdir(args.out):
                raise ConversionError(f"--out {args.out!r} is not empty; choose a new folder")
            source = load_torch_state(args.src)
            abstract = abstract_params(cfg)  # names and shapes checked before anything is built
            state = strip_prefix(source, name_map(abstract), args.prefix)
            params, report = torch_to_jax(
                state, abstract, allow_missing=args.allow_missing, ignore=args.ignore
            )
            created = _single_device_state(cfg)
            if report["allowed_missing"]:  # these keep the config's fresh init
                fresh = flatten(fresh_params(cfg, created))
                flat = flatten(params)
                for path in flat:
                    if not isinstance(flat[path], np.ndarray):
                        flat[path] = fresh[path]
                params = unflatten(flat)
            out = save_jax_checkpoint(params, cfg, args.out, created)
            print(
                f"convert_torch: {report['mapped']} tensors converted; "
                f"kept fresh init: {report['allowed_missing'] or 'none'}; "
                f"ignored: {report['ignored'] or 'none'}; checkpoint in {out} "
                f"(use --config.init_from={out})"
            )
        else:
            state = jax_to_torch(load_jax_params(args.src, args.step))
            save_torch_state(state, args.out)
            print(f"convert_torch: {len(state)} tensors written to {args.out}")
    except ConversionError as e:
        print(f"convert_torch: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
