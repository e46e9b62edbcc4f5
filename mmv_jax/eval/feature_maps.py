"""DINO-style PCA maps of patch features (matplotlib, Agg canvas; no global backend change).

- :func:`pca_feature_maps`: one PCA over the patch tokens of all the images shown, its first
  three components as RGB, scaled over all of them, so colours compare across images.
- :func:`pca_feature_map`: the same for one image.
- :func:`save_feature_maps_figure` / :func:`save_feature_map_figure`: inputs above their maps.
- :func:`patch_tokens`: an encoder's final-norm patch tokens and the model input (un-patchified)
  of whole-image views of manifest records (JAX; imported lazily).
"""

from __future__ import annotations

import os

import numpy as np

PATCH = 14

__all__ = [
    "pca_feature_maps",
    "pca_feature_map",
    "save_feature_maps_figure",
    "save_feature_map_figure",
    "patch_tokens",
]


def figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def save(fig, out_png):
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return str(out_png)


def pca_feature_maps(tokens_list, grids, slice_index=None) -> list:
    """``tokens_list[i] [n_i, d]`` of image i in patch order (z slowest), ``grids[i] (gz, gy,
    gx)`` -> RGB ``[gy, gx, 3]`` float32 in [0, 1] per image: the first three PCs of all the
    images' tokens together (one basis), each min-max scaled over all of them; for 3D (gz > 1)
    the depth slice ``slice_index`` (default the middle one, ``gz // 2``). PC signs are fixed so
    that each component's largest-magnitude loading is positive (deterministic output)."""
    toks = []
    for t, g in zip(tokens_list, grids):
        gz, gy, gx = (int(x) for x in g)
        t = np.asarray(t, np.float64)
        if t.ndim != 2 or t.shape[0] != gz * gy * gx:
            raise ValueError(f"patch_tokens must be [gz*gy*gx={gz * gy * gx}, d], got {t.shape}")
        toks.append(t)
    if len({t.shape[1] for t in toks}) > 1:
        raise ValueError("all images' tokens must have the same width d")
    allt = np.concatenate(toks)
    mean = allt.mean(0)
    _, _, vt = np.linalg.svd(allt - mean, full_matrices=False)
    vt = vt[:3]
    vt = vt * np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(1)])[:, None]
    pcs = np.zeros((allt.shape[0], 3))
    pcs[:, : vt.shape[0]] = (allt - mean) @ vt.T
    lo, hi = pcs.min(0), pcs.max(0)
    rgb = (pcs - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    out, start = [], 0
    for t, g in zip(toks, grids):
        gz, gy, gx = (int(x) for x in g)
        z = gz // 2 if slice_index is None else int(slice_index)
        out.append(rgb[start : start + t.shape[0]].reshape(gz, gy, gx, 3)[z].astype(np.float32))
        start += t.shape[0]
    return out


def pca_feature_map(patch_tokens, grid, slice_index=None):
    """:func:`pca_feature_maps` of one image."""
    return pca_feature_maps([patch_tokens], [grid], slice_index)[0]


def _mid(image):
    img = np.asarray(image, np.float32)
    return img[img.shape[0] // 2] if img.ndim == 3 else img


def save_feature_maps_figure(images, tokens_list, grids, out_png, titles=None) -> str:
    """PNG: each input (``[H, W]`` or ``[Z, H, W]``, middle slice for 3D) above its PCA map,
    one PCA across all the images shown (:func:`pca_feature_maps`)."""
    maps = pca_feature_maps(tokens_list, grids)
    n = len(maps)
    fig = figure(3.2 * n, 6.4)
    for i, (image, rgb) in enumerate(zip(images, maps)):
        img = _mid(image)
        a, b = fig.add_subplot(2, n, i + 1), fig.add_subplot(2, n, n + i + 1)
        a.imshow(img, cmap="gray")
        b.imshow(rgb, interpolation="nearest", extent=(0, img.shape[1], img.shape[0], 0))
        a.set_title(
            titles[i] if titles else ("input" + (" (mid slice)" if np.ndim(image) == 3 else "")),
            fontsize=8,
        )
        for ax in (a, b):
            ax.axis("off")
    fig.suptitle("PCA of patch features (PC1-3 = RGB, one PCA across the images)")
    return save(fig, out_png)


def save_feature_map_figure(image, patch_tokens, grid, out_png, title=None) -> str:
    """PNG of the input (``[H, W]`` or ``[Z, H, W]``, middle slice for 3D) beside its PCA map."""
    img = _mid(image)
    rgb = pca_feature_map(patch_tokens, grid)
    fig = figure(8, 4)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.imshow(img, cmap="gray")
    a.set_title("input" + ("" if np.asarray(image).ndim == 2 else " (mid slice)"))
    b.imshow(rgb, interpolation="nearest", extent=(0, img.shape[1], img.shape[0], 0))
    b.set_title("PCA of patch features (PC1-3 = RGB)")
    for ax in (a, b):
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save(fig, out_png)


def patch_tokens(cfg, encoder, records):
    """Per record (a whole-image view each, as ``mmv-embed`` sees it): ``(image, tokens [n, d],
    grid (gz, gy, gx))``, ``image`` the model input un-patchified (``[H, W]`` for 2D,
    ``[Z, H, W]`` for 3D)."""
    import jax
    import jax.numpy as jnp

    from mmv_jax.data import pipeline

    forward = jax.jit(encoder.tokens)
    out = []
    for rec in records:
        batch, _ = next(pipeline.make_eval_iterator(cfg.data, [rec], batch_size=1))
        tokens = np.asarray(forward(jax.tree.map(jnp.asarray, batch)), np.float32)[0]
        seg = np.asarray(batch.segment_ids)[0]
        coords = np.asarray(batch.coords)[0][seg == 1]
        gz, gy, gx = (len(np.unique(coords[:, a])) for a in range(3))
        patches = np.asarray(batch.patches)[0][seg == 1]
        p = PATCH
        if rec.modality == "cxr":
            img = (
                patches[:, : p * p]
                .reshape(gy, gx, p, p)
                .transpose(0, 2, 1, 3)
                .reshape(gy * p, gx * p)
            )
        else:
            img = (
                patches.reshape(gz, gy, gx, p, p, p)
                .transpose(0, 3, 1, 4, 2, 5)
                .reshape(gz * p, gy * p, gx * p)
            )
        out.append((img, tokens[seg == 1], (gz, gy, gx)))
    return out
