"""PyTorch state_dict (.safetensors / .pt / Lightning .ckpt) <-> mmv_jax Orbax checkpoint.

  python tools/convert_torch.py torch2jax --in model.safetensors --config configs/demo.py --out DIR \
      [--config.model.depth=2 ...] [--allow-missing 'projector.*'] [--ignore 'head.*'] [--prefix model.]
  python tools/convert_torch.py jax2torch --in RUN_DIR --out model.safetensors [--step N]

``torch2jax`` writes an Orbax CheckpointManager folder (item ``state`` = TrainState at step 0,
fresh optimizer) that ``--config.init_from=DIR`` accepts. ``jax2torch`` reads a run folder (its
``checkpoints``), a CheckpointManager folder, and writes the timm-style state_dict that
``tools/torch_reference`` loads (``.safetensors`` preferred; ``.pt`` = ``torch.save``).

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
import fnmatch
import importlib.util
import os
import sys
import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked (the message names the tensors)."""


# --------------------------------------------------------------------------- the name map

class Entry(NamedTuple):
    torch_name: str
    jax_path: tuple
    to_jax: Callable      # (torch array, jax shape) -> jax array
    to_torch: Callable    # jax array -> torch array


def _linear_w(t, shape):
    return t.T


def _qkv_w(t, shape):
    return t.T.reshape(shape)


def _qkv_b(t, shape):
    return t.reshape(shape)


def _proj_w(t, shape):
    return t.T.reshape(shape)


def _patch_w(t, shape):
    return t.reshape(t.shape[0], -1).T


def _ident(t, shape):
    return t


def _entry(path: tuple) -> Entry:
    """The PyTorch name and layout transforms of one JAX param path (pure-dict keys)."""
    p = tuple(path)
    last = p[-1]
    norm_leaf = {"scale": "weight", "bias": "bias"}
    dense_leaf = {"kernel": "weight", "bias": "bias"}
    lin = (_linear_w, lambda k: k.T) if last == "kernel" else (_ident, lambda b: b)
    if p[:2] == ("encoder", "patch_embed"):
        if last == "kernel":
            return Entry("patch_embed.proj.weight", p, _patch_w,
                         lambda k: k.T.reshape(k.shape[1], 1, *([round(k.shape[0] ** (1 / 3))] * 3)))
        return Entry("patch_embed.proj.bias", p, _ident, lambda b: b)
    if p[:2] == ("encoder", "norm"):
        return Entry(f"norm.{norm_leaf[last]}", p, _ident, lambda x: x)
    if p[:2] == ("encoder", "blocks") and len(p) >= 4:
        i, mod = p[2], p[3]
        pre = f"blocks.{i}"
        if mod in ("norm1", "norm2"):
            return Entry(f"{pre}.{mod}.{norm_leaf[last]}", p, _ident, lambda x: x)
        if mod in ("fc1", "fc2"):
            return Entry(f"{pre}.mlp.{mod}.{dense_leaf[last]}", p, *lin)
        if mod == "attn":
            if last == "qkv":
                return Entry(f"{pre}.attn.qkv.weight", p, _qkv_w, lambda k: k.reshape(k.shape[0], -1).T)
            if last == "qkv_bias":
                return Entry(f"{pre}.attn.qkv.bias", p, _qkv_b, lambda b: b.reshape(-1))
            if last == "proj":
                return Entry(f"{pre}.attn.proj.weight", p, _proj_w, lambda k: k.reshape(-1, k.shape[-1]).T)
            if last == "proj_bias":
                return Entry(f"{pre}.attn.proj.bias", p, _ident, lambda b: b)
    if p[0] == "projector":
        if p[1] == "hidden":
            return Entry(f"projector.layers.{p[2]}.{dense_leaf[last]}", p, *lin)
        if p[1] == "norms":
            return Entry(f"projector.norms.{p[2]}.{norm_leaf[last]}", p, _ident, lambda x: x)
        if p[1] == "out":
            return Entry(f"projector.out.{dense_leaf[last]}", p, *lin)
    raise ConversionError(f"no PyTorch name for JAX parameter {'/'.join(map(str, p))} "
                          "(tools/convert_torch.py's name map needs updating)")


def flatten(tree: dict, prefix: tuple = ()) -> "OrderedDict[tuple, object]":
    out = OrderedDict()
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def name_map(jax_tree: dict) -> "OrderedDict[str, Entry]":
    """PyTorch name -> Entry for every leaf of a JAX param pure dict (arrays or shape structs)."""
    entries = sorted((_entry(p) for p in flatten(jax_tree)), key=lambda e: _module_order(e.torch_name))
    return OrderedDict((e.torch_name, e) for e in entries)


_ORDER = ["patch_embed", "blocks", "norm", "projector", "norm1", "attn", "norm2", "mlp", "qkv",
          "proj", "fc1", "fc2", "layers", "norms", "out", "weight", "bias"]


def _module_order(name: str):
    """Sort key giving PyTorch module registration order (as ``model.state_dict()`` lists)."""
    return [(0, int(p)) if p.isdigit() else (1, _ORDER.index(p) if p in _ORDER else len(_ORDER))
            for p in name.split(".")]


def jax_to_torch(params: dict) -> "OrderedDict[str, np.ndarray]":
    """JAX param pure dict -> timm-style state_dict of float32 numpy arrays (exact), in the
    PyTorch module's order."""
    flat = flatten(params)
    return OrderedDict((e.torch_name, np.ascontiguousarray(e.to_torch(np.asarray(flat[e.jax_path]))))
                       for e in name_map(params).values())


def torch_to_jax(state: dict, reference: dict, *, allow_missing=(), ignore=()):
    """timm-style ``state`` (name -> array) -> ``(params pure dict, report)``.

    ``reference``: a JAX param pure dict (arrays or anything with ``.shape``) giving the target
    structure and shapes; parameters absent from ``state`` whose PyTorch name matches an
    ``allow_missing`` pattern are taken from ``reference`` (when it holds arrays). Source
    tensors matching an ``ignore`` pattern are dropped. Raises :class:`ConversionError` naming
    every missing, unmapped or mis-shaped tensor.
    """
    entries = name_map(reference)
    flat_ref = flatten(reference)
    out, missing, allowed_missing, misshaped = OrderedDict(), [], [], []
    for name, e in entries.items():
        shape = tuple(flat_ref[e.jax_path].shape)
        if name not in state:
            (allowed_missing if _matches(name, allow_missing) else missing).append(name)
            out[e.jax_path] = flat_ref[e.jax_path]
            continue
        t = np.asarray(state[name], dtype=np.float32)
        want = tuple(e.to_torch(np.zeros(shape, np.float32)).shape)
        if t.shape != want:
            misshaped.append(f"{name}: got {tuple(t.shape)}, expected {want}")
            continue
        out[e.jax_path] = np.ascontiguousarray(e.to_jax(t, shape))
    ignore = list(ignore or ()) + list(BN_RUNNING_STATS)
    ignored = sorted(k for k in state if k not in entries and _matches(k, ignore))
    unmapped = sorted(k for k in state if k not in entries and not _matches(k, ignore))
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the PyTorch checkpoint "
                        f"(allow with --allow-missing PATTERN): {', '.join(missing)}")
    if unmapped:
        problems.append(f"{len(unmapped)} PyTorch tensor(s) with no mmv_jax parameter "
                        f"(drop with --ignore PATTERN): {', '.join(unmapped)}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensor(s) of the wrong shape: {'; '.join(misshaped)}")
    if problems:
        raise ConversionError("refusing a partial conversion:\n  " + "\n  ".join(problems))
    report = {"mapped": len(entries) - len(allowed_missing), "allowed_missing": allowed_missing,
              "ignored": ignored}
    return unflatten(out), report


# A PyTorch projector with nn.BatchNorm1d carries running statistics; ours always normalises
# with the batch's statistics (the LeJEPA reference in training), so they have no counterpart.
BN_RUNNING_STATS = ("projector.norms.*.running_mean", "projector.norms.*.running_var",
                    "projector.norms.*.num_batches_tracked")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


# --------------------------------------------------------------------------- PyTorch files

_NESTED = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def load_torch_state(path: str) -> "OrderedDict[str, np.ndarray]":
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
                raise ConversionError(f"--in {path!r}: not a readable safetensors file ({e})") from None
    import pickle
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"--in {path!r}: refusing to load: the file holds pickled objects beyond tensors and "
            f"containers, and untrusted pickles may run code (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]}). Save `model.state_dict()` with torch.save, or better as "
            f".safetensors, and convert that.") from None
    except Exception as e:
        raise ConversionError(f"--in {path!r}: not a readable PyTorch checkpoint ({e})") from None
    return _tensor_dict(obj, path)


def _tensor_dict(obj, path) -> "OrderedDict[str, np.ndarray]":
    import torch
    is_t = lambda v: isinstance(v, torch.Tensor)
    for _ in range(4):  # Lightning {"state_dict": ...}, {"model": ...}, DDP wrappers ...
        if isinstance(obj, dict) and obj and all(is_t(v) for v in obj.values()):
            break
        inner = next((obj[k] for k in _NESTED if isinstance(obj, dict) and isinstance(obj.get(k), dict)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ConversionError(f"--in {path!r}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    tensors = OrderedDict((k, v.detach().float().numpy()) for k, v in obj.items() if is_t(v))
    if not tensors:
        raise ConversionError(f"--in {path!r}: no tensors found (keys: {list(obj)[:10]})")
    return tensors


def strip_prefix(state: dict, expected, prefix: str | None = None) -> "OrderedDict[str, np.ndarray]":
    """Drops the key prefix (``model.``, ``module.``, ``model._orig_mod.`` ...) under which most
    keys become expected names (or the given ``prefix``); other keys are left as they are."""
    expected = set(expected)
    if prefix is None:
        votes: dict[str, int] = {}
        for k in state:
            for e in expected:
                if k.endswith(e) and (len(k) == len(e) or k[-len(e) - 1] == "."):
                    votes[k[:len(k) - len(e)]] = votes.get(k[:len(k) - len(e)], 0) + 1
        prefix = max(votes, key=lambda p: (votes[p], -len(p))) if votes else ""
    return OrderedDict((k[len(prefix):] if prefix and k.startswith(prefix) else k, v)
                       for k, v in state.items())


def save_torch_state(state: dict, path: str) -> None:
    import torch
    tensors = OrderedDict((k, torch.from_numpy(np.array(v, dtype=np.float32))) for k, v in state.items())
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
        key, _, raw = item[len("--config."):].partition("=")
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
            raise ConversionError(f"--out {out_dir!r} already holds a checkpoint; choose an empty folder")
        ckpt.save(0, state, force=True)
    finally:
        ckpt.close()
    return ckpt.directory


def abstract_params(cfg) -> dict:
    """The config's param shapes (pure dict of ShapeDtypeStruct), without computing anything."""
    from flax import nnx
    from mmv_jax.train import state as st
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: st.build_model(cfg, seed=cfg.seed)), nnx.Param))


def fresh_params(cfg, created=None) -> dict:
    """The config's freshly initialised params as a pure dict of numpy arrays."""
    import jax
    from flax import nnx
    _, state, _ = created or _single_device_state(cfg)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


def load_jax_params(path: str, step: int | None = None) -> dict:
    """Params pure dict (numpy) of a run folder, its ``checkpoints``, or a CheckpointManager
    folder, as saved (no config needed)."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    for directory in (os.path.join(path, "checkpoints"), path):
        if not os.path.isdir(directory):
            continue
        mgr = ocp.CheckpointManager(directory)
        try:
            s = mgr.latest_step() if step is None else step
            if s is None:
                continue
            with warnings.catch_warnings():  # "sharding info not provided": host arrays wanted
                warnings.simplefilter("ignore", UserWarning)
                restored = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
        finally:
            mgr.close()
        params = restored["state"]["params"]
        return _strip_value(params)
    raise ConversionError(f"--in {path!r}: no Orbax checkpoint found there (nor in its checkpoints/)")


def _strip_value(tree):
    """Orbax stores nnx Params as ``{..., name: {"value": array}}``; list indices as strings."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return np.asarray(tree["value"])
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _strip_value(v)
                for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {i: _strip_value(v) for i, v in enumerate(tree)}
    return np.asarray(tree)


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
    t2j.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN",
                     help="PyTorch names (fnmatch) that may be missing; they keep the fresh init")
    t2j.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                     help="PyTorch tensors (fnmatch) to drop, e.g. 'head.*'")
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
            abstract = abstract_params(cfg)   # names and shapes checked before anything is built
            state = strip_prefix(source, name_map(abstract), args.prefix)
            params, report = torch_to_jax(state, abstract, allow_missing=args.allow_missing,
                                          ignore=args.ignore)
            created = _single_device_state(cfg)
            if report["allowed_missing"]:  # these keep the config's fresh init
                fresh = flatten(fresh_params(cfg, created))
                flat = flatten(params)
                for path in flat:
                    if not isinstance(flat[path], np.ndarray):
                        flat[path] = fresh[path]
                params = unflatten(flat)
            out = save_jax_checkpoint(params, cfg, args.out, created)
            print(f"convert_torch: {report['mapped']} tensors converted; "
                  f"kept fresh init: {report['allowed_missing'] or 'none'}; "
                  f"ignored: {report['ignored'] or 'none'}; checkpoint in {out} "
                  f"(use --config.init_from={out})")
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
