"""LeJEPA loss in PyTorch (METHOD.md): prediction loss + SIGReg (Epps-Pulley statistic of 1D
projections against N(0, 1), 17-knot trapezoid on [0, 3], doubled, window exp(-t^2/2), scaled by
the sample count). SIGReg takes the projection directions explicitly (``directions [D, K]``,
unit columns), so the same directions can be fed to the JAX and PyTorch implementations.
"""

from __future__ import annotations

import numpy as np
import torch


def _t(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def random_directions(dim: int, num_slices: int, generator: torch.Generator | None = None):
    a = torch.randn(dim, num_slices, generator=generator)
    return a / a.norm(dim=0, keepdim=True)


def _quadrature(t_max: float, knots: int):
    if knots < 2:
        raise ValueError(f"epps_pulley needs knots >= 2, got {knots}")
    t = torch.linspace(0.0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    w = torch.full((knots,), 2.0 * dt, dtype=torch.float32)
    w[0] = w[-1] = dt
    phi = torch.exp(-0.5 * t * t)
    return t, phi, w * phi


def epps_pulley(x, *, t_max: float = 3.0, knots: int = 17, mask=None):
    """``x [..., N, K]`` -> ``[..., K]``; ``mask [..., N]`` leaves samples out."""
    x = _t(x, torch.float32)
    t, phi, weights = _quadrature(t_max, knots)
    xt = x[..., None] * t
    if mask is None:
        n = torch.tensor(float(x.shape[-2]))
        cos_mean, sin_mean = torch.cos(xt).mean(-3), torch.sin(xt).mean(-3)
    else:
        m = _t(mask, torch.float32).expand(x.shape[:-1])
        n = m.sum(-1)[..., None]
        wm = m[..., None, None]
        denom = n.clamp_min(1.0)[..., None]
        cos_mean = (torch.cos(xt) * wm).sum(-3) / denom
        sin_mean = (torch.sin(xt) * wm).sum(-3) / denom
    err = (cos_mean - phi).square() + sin_mean.square()
    return (err @ weights) * n


def sigreg(z, directions, *, t_max: float = 3.0, knots: int = 17, mask=None):
    """Mean Epps-Pulley statistic of ``z [..., N, D] @ directions [D, K]``."""
    z = _t(z, torch.float32)
    return epps_pulley(
        z @ _t(directions, torch.float32), t_max=t_max, knots=knots, mask=mask
    ).mean()


def _flat(emb, view_sample):
    e = emb.to(torch.float32).reshape(-1, emb.shape[-1])
    s = _t(view_sample, torch.int64).reshape(-1)
    valid = s >= 0
    return torch.where(valid[:, None], e, torch.zeros_like(e)), s, valid


def prediction_loss(
    emb, view_sample, view_is_global, *, num_samples: int, pred_reduce: str = "sum"
):
    """``mean_s (1/V_s) sum_v ||mu_s - z_v||^2`` with mu_s the mean of sample s's global views;
    samples without a global view are left out."""
    if pred_reduce not in ("sum", "mean"):
        raise ValueError(f"pred_reduce must be 'sum' or 'mean', got {pred_reduce!r}")
    e, s, valid = _flat(emb, view_sample)
    seg = torch.where(valid, s, torch.full_like(s, num_samples))
    glob = (valid & _t(view_is_global, torch.bool).reshape(-1)).to(torch.float32)
    nseg = num_samples + 1
    g_sum = e.new_zeros(nseg, e.shape[-1]).index_add(0, seg, e * glob[:, None])[:num_samples]
    g_cnt = e.new_zeros(nseg).index_add(0, seg, glob)[:num_samples]
    v_cnt = e.new_zeros(nseg).index_add(0, seg, valid.to(torch.float32))[:num_samples]
    mu = g_sum / g_cnt.clamp_min(1.0)[:, None]
    d = (mu[seg.clamp(0, num_samples - 1)] - e).square()
    d = d.sum(-1) if pred_reduce == "sum" else d.mean(-1)
    d = torch.where(valid, d, torch.zeros_like(d))
    per_sample = e.new_zeros(nseg).index_add(0, seg, d)[:num_samples] / v_cnt.clamp_min(1.0)
    keep = (g_cnt > 0).to(torch.float32)
    return (per_sample * keep).sum() / keep.sum().clamp_min(1.0)


def scatter_views(emb, view_sample, view_index, *, num_samples: int, num_views: int):
    """``emb [R, V, D]`` -> ``(z [num_views, num_samples, D], present [num_views, num_samples])``."""
    e, s, valid = _flat(emb, view_sample)
    vi = _t(view_index, torch.int64).reshape(-1)
    valid = valid & (vi >= 0) & (vi < num_views) & (s < num_samples)
    e = torch.where(valid[:, None], e, torch.zeros_like(e))
    vi = torch.where(valid, vi, torch.zeros_like(vi))
    si = torch.where(valid, s, torch.zeros_like(s))
    flat = vi * num_samples + si
    z = e.new_zeros(num_views * num_samples, e.shape[-1]).index_add(0, flat, e)
    present = e.new_zeros(num_views * num_samples).index_add(0, flat, valid.to(torch.float32)) > 0
    return (z.reshape(num_views, num_samples, -1), present.reshape(num_views, num_samples))


def lejepa_loss(
    emb,
    view_sample,
    view_is_global,
    view_index,
    *,
    directions,
    num_samples: int,
    num_views: int,
    lam: float = 0.025,
    t_max: float = 3.0,
    knots: int = 17,
    pred_reduce: str = "sum",
    mask_absent: bool = True,
):
    """``(1 - lam) * prediction_loss + lam * sigreg`` -> ``(loss, aux)`` (aux: pred_loss,
    sigreg_loss). SIGReg on the ``[num_views, num_samples, D]`` scatter, absent pairs masked."""
    pred = prediction_loss(
        emb, view_sample, view_is_global, num_samples=num_samples, pred_reduce=pred_reduce
    )
    z, present = scatter_views(
        emb, view_sample, view_index, num_samples=num_samples, num_views=num_views
    )
    sig = sigreg(z, directions, t_max=t_max, knots=knots, mask=present if mask_absent else None)
    return (1.0 - lam) * pred + lam * sig, {"pred_loss": pred, "sigreg_loss": sig}
