"""The name map between mmv_jax params and the timm-style PyTorch state_dict, and the tensor
layout conversions both ways (numpy only: no torch, no JAX). Used by the export folder
(:mod:`mmv_jax.export`), :mod:`mmv_jax.torch` and ``tools/convert_torch.py`` (layouts in its
docstring)."""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked (the message names the tensors)."""


# --------------------------------------------------------------------------- the name map


class Entry(NamedTuple):
    torch_name: str
    jax_path: tuple
    to_jax: Callable  # (torch array, jax shape) -> jax array
    to_torch: Callable  # jax array -> torch array


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
            return Entry(
                "patch_embed.proj.weight",
                p,
                _patch_w,
                lambda k: k.T.reshape(k.shape[1], 1, *([round(k.shape[0] ** (1 / 3))] * 3)),
            )
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
                return Entry(
                    f"{pre}.attn.qkv.weight", p, _qkv_w, lambda k: k.reshape(k.shape[0], -1).T
                )
            if last == "qkv_bias":
                return Entry(f"{pre}.attn.qkv.bias", p, _qkv_b, lambda b: b.reshape(-1))
            if last == "proj":
                return Entry(
                    f"{pre}.attn.proj.weight", p, _proj_w, lambda k: k.reshape(-1, k.shape[-1]).T
                )
            if last == "proj_bias":
                return Entry(f"{pre}.attn.proj.bias", p, _ident, lambda b: b)
    if p[0] == "projector":
        if p[1] == "hidden":
            return Entry(f"projector.layers.{p[2]}.{dense_leaf[last]}", p, *lin)
        if p[1] == "norms":
            return Entry(f"projector.norms.{p[2]}.{norm_leaf[last]}", p, _ident, lambda x: x)
        if p[1] == "out":
            return Entry(f"projector.out.{dense_leaf[last]}", p, *lin)
    raise ConversionError(
        f"no PyTorch name for JAX parameter {'/'.join(map(str, p))} "
        "(mmv_jax/torch/names.py's name map needs updating)"
    )


def flatten(tree: dict, prefix: tuple = ()) -> OrderedDict[tuple, object]:
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


def name_map(jax_tree: dict) -> OrderedDict[str, Entry]:
    """PyTorch name -> Entry for every leaf of a JAX param pure dict (arrays or shape structs)."""
    entries = sorted(
        (_entry(p) for p in flatten(jax_tree)), key=lambda e: _module_order(e.torch_name)
    )
    return OrderedDict((e.torch_name, e) for e in entries)


_ORDER = [
    "patch_embed",
    "blocks",
    "norm",
    "projector",
    "norm1",
    "attn",
    "norm2",
    "mlp",
    "qkv",
    "proj",
    "fc1",
    "fc2",
    "layers",
    "norms",
    "out",
    "weight",
    "bias",
]


def _module_order(name: str):
    """Sort key giving PyTorch module registration order (as ``model.state_dict()`` lists)."""
    return [
        (0, int(p)) if p.isdigit() else (1, _ORDER.index(p) if p in _ORDER else len(_ORDER))
        for p in name.split(".")
    ]


def jax_to_torch(params: dict) -> OrderedDict[str, np.ndarray]:
    """JAX param pure dict -> timm-style state_dict of float32 numpy arrays (exact), in the
    PyTorch module's order."""
    flat = flatten(params)
    return OrderedDict(
        (e.torch_name, np.ascontiguousarray(e.to_torch(np.asarray(flat[e.jax_path]))))
        for e in name_map(params).values()
    )


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
        problems.append(
            f"{len(missing)} parameter(s) missing from the PyTorch checkpoint "
            f"(allow with --allow-missing PATTERN): {', '.join(missing)}"
        )
    if unmapped:
        problems.append(
            f"{len(unmapped)} PyTorch tensor(s) with no mmv_jax parameter "
            f"(drop with --ignore PATTERN): {', '.join(unmapped)}"
        )
    if misshaped:
        problems.append(f"{len(misshaped)} tensor(s) of the wrong shape: {'; '.join(misshaped)}")
    if problems:
        raise ConversionError("refusing a partial conversion:\n  " + "\n  ".join(problems))
    report = {
        "mapped": len(entries) - len(allowed_missing),
        "allowed_missing": allowed_missing,
        "ignored": ignored,
    }
    return unflatten(out), report


# A PyTorch projector with nn.BatchNorm1d carries running statistics; ours always normalises
# with the batch's statistics (the LeJEPA reference in training), so they have no counterpart.
BN_RUNNING_STATS = (
    "projector.norms.*.running_mean",
    "projector.norms.*.running_var",
    "projector.norms.*.num_batches_tracked",
)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())
