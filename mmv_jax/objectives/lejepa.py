"""LeJEPA objective: prediction loss + SIGReg (Epps-Pulley on random 1D projections).

Pure ``jax.numpy``; imports nothing of the package. Every function works on the *global*
arrays it is given, so jitting over a mesh computes exactly the single-device statistics
(XLA inserts the collectives; there is no per-shard code here).

Conventions (METHOD.md, Balestriero & LeCun 2025, and the LeJEPA minimal reference code):

- ``epps_pulley``: ``N * int_{-t_max}^{t_max} |ecf(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt``,
  evaluated as twice the trapezoid rule on ``[0, t_max]`` with ``knots`` nodes (the integrand
  is even in t). ``ecf(t) = mean_n exp(i t x_n)``.
- ``sigreg``: mean of ``epps_pulley(z @ A)`` over ``num_slices`` unit-norm Gaussian directions
  ``A [D, num_slices]`` drawn from ``key``. For ``z [V, N, D]`` the statistic is taken over the
  N samples of each view index and averaged over views and directions.
- ``prediction_loss``: ``mu_s`` = mean of sample s's global-view embeddings;
  ``L_pred = mean_s (1/V_s) sum_v ||mu_s - z_v||^2`` over all V_s views of s (globals
  included), with the squared distance either summed over the embedding dimension
  (``pred_reduce="sum"``, this function's default) or averaged over it as the LeJEPA reference
  code does (``(centers - proj).square().mean()``: ``pred_reduce="mean"``, ``"sum"`` divided by
  D). The run configs use ``"mean"``, the weighting lam = 0.025 was tuned with.
- ``lejepa_loss = (1 - lam) * L_pred + lam * SIGReg``, lam = 0.025.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["epps_pulley", "sigreg", "prediction_loss", "scatter_views", "lejepa_loss"]


def _quadrature(t_max: float, knots: int):
    """Knots t, the N(0,1) characteristic function phi(t) = exp(-t^2/2), and the trapezoid
    weights on [0, t_max] doubled for symmetry, times the window exp(-t^2/2)."""
    if knots < 2:
        raise ValueError(f"epps_pulley needs knots >= 2, got {knots}")
    t = jnp.linspace(0.0, t_max, knots, dtype=jnp.float32)
    dt = t_max / (knots - 1)
    w = jnp.full((knots,), 2.0 * dt, jnp.float32).at[0].set(dt).at[-1].set(dt)
    phi = jnp.exp(-0.5 * t * t)
    return t, phi, w * phi


def epps_pulley(x, *, t_max: float = 3.0, knots: int = 17, mask=None):
    """Epps-Pulley statistic of each column of ``x [..., N, K]`` against N(0, 1) -> ``[..., K]``.

    ``mask`` (optional, ``[..., N]`` bool/0-1, broadcastable): samples with mask 0 are left out;
    the ecf is then the mean over the kept samples and the scale N is their count. Without a
    mask this is exactly the LeJEPA reference statistic.
    """
    x = jnp.asarray(x, jnp.float32)
    t, phi, weights = _quadrature(t_max, knots)
    xt = x[..., None] * t  # [..., N, K, T]
    if mask is None:
        n = jnp.asarray(x.shape[-2], jnp.float32)
        cos_mean = jnp.cos(xt).mean(axis=-3)  # [..., K, T]
        sin_mean = jnp.sin(xt).mean(axis=-3)
    else:
        m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape[:-1])  # [..., N]
        n = m.sum(axis=-1)[..., None]  # [..., 1]
        wm = m[..., None, None]
        denom = jnp.maximum(n, 1.0)[..., None]  # [..., 1, 1]
        cos_mean = (jnp.cos(xt) * wm).sum(axis=-3) / denom
        sin_mean = (jnp.sin(xt) * wm).sum(axis=-3) / denom
    err = jnp.square(cos_mean - phi) + jnp.square(sin_mean)  # [..., K, T]
    return (err @ weights) * n


def sigreg_directions(key, dim: int, num_slices: int = 256):
    """The unit-norm Gaussian directions ``[dim, num_slices]`` :func:`sigreg` draws from ``key``."""
    a = jax.random.normal(key, (dim, num_slices), jnp.float32)
    return a / jnp.linalg.norm(a, axis=0, keepdims=True)


def sigreg(z, key, *, num_slices: int = 256, t_max: float = 3.0, knots: int = 17, mask=None):
    """SIGReg of ``z [..., N, D]``: mean Epps-Pulley statistic over ``num_slices`` random unit
    directions (fresh for each ``key``, :func:`sigreg_directions`) and over all leading indices
    (e.g. view indices). ``mask [..., N]`` optionally leaves samples out (see :func:`epps_pulley`)."""
    z = jnp.asarray(z, jnp.float32)
    a = sigreg_directions(key, z.shape[-1], num_slices)
    return epps_pulley(z @ a, t_max=t_max, knots=knots, mask=mask).mean()


def _flat(emb, view_sample):
    e = jnp.asarray(emb, jnp.float32).reshape(-1, emb.shape[-1])
    s = jnp.asarray(view_sample, jnp.int32).reshape(-1)
    valid = s >= 0
    # Empty slots are zeroed through `where`, so they carry neither value nor gradient
    # (even if the encoder produced NaN/inf there).
    e = jnp.where(valid[:, None], e, 0.0)
    return e, s, valid


def prediction_loss(
    emb, view_sample, view_is_global, *, num_samples: int, pred_reduce: str = "sum"
):
    """LeJEPA prediction loss on packed per-view embeddings.

    emb ``[R, V, D]``; view_sample ``[R, V]`` (-1 = empty slot); view_is_global ``[R, V]``.
    ``num_samples`` (static) bounds the sample indices. Samples with no view, or with no global
    view (no centroid), are left out of the mean over samples.
    """
    if pred_reduce not in ("sum", "mean"):
        raise ValueError(f"pred_reduce must be 'sum' or 'mean', got {pred_reduce!r}")
    e, s, valid = _flat(emb, view_sample)
    seg = jnp.where(valid, s, num_samples)  # empty slots -> dump bucket
    glob = (valid & jnp.asarray(view_is_global, bool).reshape(-1)).astype(jnp.float32)
    nseg = num_samples + 1
    g_sum = jax.ops.segment_sum(e * glob[:, None], seg, nseg)[:num_samples]
    g_cnt = jax.ops.segment_sum(glob, seg, nseg)[:num_samples]
    v_cnt = jax.ops.segment_sum(valid.astype(jnp.float32), seg, nseg)[:num_samples]
    mu = g_sum / jnp.maximum(g_cnt, 1.0)[:, None]  # [num_samples, D]
    diff = mu[jnp.clip(seg, 0, num_samples - 1)] - e
    d = jnp.square(diff)
    d = d.sum(-1) if pred_reduce == "sum" else d.mean(-1)
    d = jnp.where(valid, d, 0.0)
    per_sample = jax.ops.segment_sum(d, seg, nseg)[:num_samples] / jnp.maximum(v_cnt, 1.0)
    keep = (g_cnt > 0).astype(jnp.float32)
    return (per_sample * keep).sum() / jnp.maximum(keep.sum(), 1.0)


def scatter_views(emb, view_sample, view_index, *, num_samples: int, num_views: int):
    """Scatter packed ``emb [R, V, D]`` into ``[num_views, num_samples, D]`` by
    ``(view_index, view_sample)``; returns ``(z, present)`` with ``present [num_views,
    num_samples]`` bool. Absent entries are zero. Views with an index >= num_views are dropped."""
    e, s, valid = _flat(emb, view_sample)
    vi = jnp.asarray(view_index, jnp.int32).reshape(-1)
    valid = valid & (vi >= 0) & (vi < num_views) & (s < num_samples)
    e = jnp.where(valid[:, None], e, 0.0)
    vi = jnp.where(valid, vi, 0)
    si = jnp.where(valid, s, 0)
    z = jnp.zeros((num_views, num_samples, e.shape[-1]), jnp.float32).at[vi, si].add(e)
    present = (
        jnp.zeros((num_views, num_samples), jnp.float32).at[vi, si].add(valid.astype(jnp.float32))
        > 0
    )
    return z, present


def lejepa_loss(
    emb,
    view_sample,
    view_is_global,
    view_index,
    *,
    num_samples: int,
    num_views: int,
    key,
    lam: float = 0.025,
    num_slices: int = 256,
    t_max: float = 3.0,
    knots: int = 17,
    pred_reduce: str = "sum",
    mask_absent: bool = True,
):
    """``(1 - lam) * prediction_loss + lam * sigreg`` on a PackedBatch's per-view projector
    outputs ``emb [R, V, D]``. Returns ``(loss, aux)``; aux holds jax scalars ``pred_loss``,
    ``sigreg_loss``, ``num_views`` (number of non-empty view slots).

    SIGReg runs on the ``[num_views, num_samples, D]`` tensor scattered by
    ``(view_index, view_sample)``. Training batches hold all ``num_views`` views of every
    sample, where this equals the LeJEPA reference exactly. With ``mask_absent`` (default) a
    (view index, sample) pair that is absent is left out of that view index's statistic rather
    than entering as a zero embedding (identical when nothing is absent).
    """
    pred = prediction_loss(
        emb, view_sample, view_is_global, num_samples=num_samples, pred_reduce=pred_reduce
    )
    z, present = scatter_views(
        emb, view_sample, view_index, num_samples=num_samples, num_views=num_views
    )
    sig = sigreg(
        z,
        key,
        num_slices=num_slices,
        t_max=t_max,
        knots=knots,
        mask=present if mask_absent else None,
    )
    loss = (1.0 - lam) * pred + lam * sig
    aux = {
        "pred_loss": pred,
        "sigreg_loss": sig,
        "num_views": (jnp.asarray(view_sample) >= 0).sum(),
    }
    return loss, aux
