"""3D rotary position embedding (METHOD.md).

Each token carries normalised grid coordinates ``(z, y, x)`` (``axis_coords`` per axis; a 2D
input has depth coordinate 0). The head dimension is split equally over the three axes:
``n = head_dim // 6`` rotary pairs per axis, frequencies ``base ** (-i / n)``, ``i < n``; the
``head_dim - 6 n`` leftover dims pass unrotated. Axis ``a`` owns dims ``[2 n a, 2 n (a + 1))``,
rotated in rotate-half form: the first ``n`` of them pair with the next ``n``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mmv_jax.batch import ALPHA, axis_coords as _axis_coords


def axis_coords(g: int, alpha: float = ALPHA) -> np.ndarray:
    """``[g]`` float32: ``alpha * i / max(g - 1, 1)`` (the contract; shared with the data side)."""
    return _axis_coords(g, alpha)


def pairs_per_axis(head_dim: int) -> int:
    n = head_dim // 6
    if n < 1:
        raise ValueError(
            f"3D RoPE needs head_dim >= 6 (one rotary pair per axis); got head_dim={head_dim}"
        )
    return n


def rope_tables(coords, head_dim: int, base: float = 10_000.0):
    """``coords [..., 3]`` -> ``(cos, sin)`` each ``[..., 3 n]`` float32 (axis-major)."""
    n = pairs_per_axis(head_dim)
    inv_freq = base ** (-np.arange(n, dtype=np.float64) / n)
    angles = coords.astype(jnp.float32)[..., :, None] * jnp.asarray(inv_freq, jnp.float32)
    angles = angles.reshape(*coords.shape[:-1], 3 * n)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotates ``x [B, S, H, D]`` by per-token tables ``cos, sin [B, S, 3 n]``."""
    d = x.shape[-1]
    n = cos.shape[-1] // 3
    rot, rest = x[..., : 6 * n], x[..., 6 * n :]
    r = rot.reshape(*x.shape[:-1], 3, 2, n).astype(jnp.float32)
    x1, x2 = r[..., 0, :], r[..., 1, :]
    c = cos.reshape(*cos.shape[:-1], 3, n)[:, :, None]
    s = sin.reshape(*sin.shape[:-1], 3, n)[:, :, None]
    out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2)
    out = out.reshape(*x.shape[:-1], 6 * n).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if d > 6 * n else out
