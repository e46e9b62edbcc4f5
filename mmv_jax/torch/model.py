"""SparseMedicalViT in PyTorch (METHOD.md): packed 2D/3D patch rows, 3D RoPE, attention that
never crosses a segment (view) boundary, pre-norm blocks, per-view mean pooling, projector.

Inputs are the fields of a ``mmv_jax.batch.PackedBatch`` as torch tensors (or numpy arrays):
``patches [R, S, P^3]`` (or ``[R, S, P^2]``, depth slice 0 only, for a 2D-only bucket),
``segment_ids [R, S]`` (0 = padding, ``j + 1`` = view slot ``j``), ``coords [R, S, 3]``.

Attention has two paths, both exact:

- ``"varlen"``: scaled-dot-product attention once per segment (the FlashAttention-varlen
  semantics of the original, on CPU);
- ``"mask"``: one SDPA call per layer over the whole row with a dense boolean block mask.

Padding query rows output zeros in both (as the JAX kernels do).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
VARIANTS = {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12)}  # width, depth, heads


def _t(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if dtype is None else t.to(dtype)


# --------------------------------------------------------------------------- 3D RoPE


def pairs_per_axis(head_dim: int) -> int:
    n = head_dim // 6
    if n < 1:
        raise ValueError(f"3D RoPE needs head_dim >= 6, got {head_dim}")
    return n


def rope_tables(coords: torch.Tensor, head_dim: int, base: float = 10_000.0):
    """``coords [..., 3]`` -> ``(cos, sin)`` each ``[..., 3 n]`` fp32, axis-major
    (axis a, frequency i at index ``a n + i``; frequency ``base ** (-i / n)``)."""
    n = pairs_per_axis(head_dim)
    inv_freq = torch.from_numpy(base ** (-np.arange(n, dtype=np.float64) / n)).to(torch.float32)
    angles = coords.to(torch.float32)[..., :, None] * inv_freq
    angles = angles.reshape(*coords.shape[:-1], 3 * n)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [B, S, H, D]`` by ``cos, sin [B, S, 3 n]`` (or any layout ``[..., D]`` with
    tables that broadcast as ``[..., 3 n]``, e.g. ``x [B, H, S, D]`` with ``[B, 1, S, 3 n]``):
    axis a owns dims ``[2 n a, 2 n (a + 1))``, the first n of them pair with the next n
    (rotate-half); dims past ``6 n`` pass unrotated."""
    d = x.shape[-1]
    n = cos.shape[-1] // 3
    if cos.dim() == x.dim() - 1:  # [B, S, 3n] tables for [B, S, H, D]
        cos, sin = cos[:, :, None], sin[:, :, None]
    r = x[..., : 6 * n].reshape(*x.shape[:-1], 3, 2, n)
    x1, x2 = r[..., 0, :], r[..., 1, :]
    c = cos.reshape(*cos.shape[:-1], 3, n)
    s = sin.reshape(*sin.shape[:-1], 3, n)
    out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-2).reshape(*x.shape[:-1], 6 * n)
    return torch.cat([out, x[..., 6 * n :]], dim=-1) if d > 6 * n else out


# --------------------------------------------------------------------------- segments


@dataclass
class SegmentLayout:
    """Host-side description of a packed batch's segments (computed once, shared by layers).

    ``runs[r]`` = ``[(start, end), ...]`` contiguous non-padding segments of row r;
    ``mask`` = ``[R, 1, S, S]`` bool block mask (padding queries see themselves only, so the
    softmax stays finite; their outputs are zeroed); ``valid`` = ``[R, S, 1, 1]`` float.
    """

    runs: list
    seq_len: int
    segment_ids: torch.Tensor
    _mask: torch.Tensor | None = None

    @classmethod
    def from_segment_ids(cls, segment_ids) -> SegmentLayout:
        seg = np.asarray(
            segment_ids.cpu() if isinstance(segment_ids, torch.Tensor) else segment_ids
        )
        runs = []
        for row in seg:
            change = np.flatnonzero(np.diff(row)) + 1
            starts = np.concatenate([[0], change])
            ends = np.concatenate([change, [len(row)]])
            runs.append([(int(a), int(b)) for a, b in zip(starts, ends) if row[a] > 0])
        return cls(runs, seg.shape[1], _t(seg, torch.int64))

    @functools.cached_property
    def chunks(self) -> list:
        """Per row: ``(sizes, is_segment)`` covering the row: segments and padding gaps."""
        out = []
        for runs in self.runs:
            sizes, real, pos = [], [], 0
            for a, b in runs:
                if a > pos:
                    sizes.append(a - pos)
                    real.append(False)
                sizes.append(b - a)
                real.append(True)
                pos = b
            if pos < self.seq_len:
                sizes.append(self.seq_len - pos)
                real.append(False)
            out.append((sizes, real))
        return out

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            seg = self.segment_ids
            same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
            eye = torch.eye(seg.shape[1], dtype=torch.bool)[None]
            self._mask = (same | ((seg[:, :, None] == 0) & eye))[:, None]
        return self._mask

    @property
    def valid(self) -> torch.Tensor:
        return (self.segment_ids > 0).to(torch.float32)[:, :, None, None]


def segment_attention(q, k, v, layout: SegmentLayout, impl: str = "varlen"):
    """``softmax(q k^T / sqrt(D)) v`` within each segment; q, k, v ``[B, H, S, D]`` -> same.

    ``varlen`` splits each row along S into its segments (a split's backward is one concat, not
    a zero-filled full-size gradient per segment) and runs 4-D SDPA on contiguous chunks
    (PyTorch's fused flash CPU kernel) on each; ``mask`` is one SDPA call with the block mask."""
    if impl == "mask":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask)
        return o * layout.valid.transpose(1, 2).to(o.dtype)
    if impl != "varlen":
        raise ValueError(f"attention impl must be 'varlen' or 'mask', got {impl!r}")
    rows = []
    for r, (sizes, real) in enumerate(layout.chunks):
        qs, ks, vs = (torch.split(t[r : r + 1], sizes, dim=2) for t in (q, k, v))
        parts = [
            F.scaled_dot_product_attention(a.contiguous(), b.contiguous(), c.contiguous())
            if keep
            else torch.zeros_like(a)
            for a, b, c, keep in zip(qs, ks, vs, real)
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


# --------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    """timm-style ``proj = Conv3d(1, d, P, stride=P)``; applied to already-flattened
    ``(pz, py, px)`` patch vectors as a matmul (a ``[.., P^2]`` 2D patch uses depth slice 0)."""

    def __init__(self, dim: int, patch: int = PATCH):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(1, dim, kernel_size=patch, stride=patch)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        p2, p3 = self.patch**2, self.patch**3
        if patches.shape[-1] == p2:
            w = w[:, :p2]
        elif patches.shape[-1] != p3:
            raise ValueError(f"patches must have {p3} or {p2} entries, got {patches.shape[-1]}")
        return F.linear(patches, w, self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        pairs_per_axis(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # output index (t, h, k) in C order
        self.proj = nn.Linear(dim, dim)  # input index (h, k)

    def forward(self, x, cos, sin, layout: SegmentLayout, impl: str):
        """``cos, sin``: ``[B, 1, S, 3 n]`` (head-major layout)."""
        b, s, _ = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # H in the role of S: same math
        o = segment_attention(q, k, v, layout, impl)
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x, cos, sin, layout, impl):
        x = x + self.attn(self.norm1(x), cos, sin, layout, impl)
        return x + self.mlp(self.norm2(x))


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the real views of the whole batch (batch statistics always, biased
    variance, no running averages): the LeJEPA reference projector's BatchNorm1d in training
    mode, with empty view slots masked out."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x, mask):
        w = mask.to(torch.float32)[..., None]
        n = w.sum().clamp_min(1.0)
        axes = tuple(range(x.dim() - 1))
        mean = (x * w).sum(axes) / n
        var = ((x - mean).square() * w).sum(axes) / n
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class Projector(nn.Module):
    """``layers - 1`` times (Linear -> norm -> GELU), then Linear ``out``; ``norm="batch"``
    (masked BatchNorm over the batch's real views) or ``"layer"`` (LayerNorm). The defaults
    live in :class:`MultiMedVisionTorch`."""

    def __init__(self, din: int, hidden: int, dout: int, layers: int, eps: float, norm: str):
        super().__init__()
        if norm not in ("batch", "layer"):
            raise ValueError(f"projector norm must be 'batch' or 'layer', got {norm!r}")
        dims = [din] + [hidden] * (layers - 1)
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.norms = nn.ModuleList(
            [MaskedBatchNorm(b) if norm == "batch" else nn.LayerNorm(b, eps=eps) for b in dims[1:]]
        )
        self.out = nn.Linear(dims[-1], dout)

    def forward(self, x, mask):
        for lin, norm in zip(self.layers, self.norms):
            h = lin(x)
            h = norm(h, mask) if isinstance(norm, MaskedBatchNorm) else norm(h)
            x = F.gelu(h)
        return self.out(x)


def pool_views(tokens: torch.Tensor, segment_ids: torch.Tensor, slots: int) -> torch.Tensor:
    """Mean of each segment's tokens ``[R, S, d]`` -> ``[R, V, d]`` fp32 (empty slots -> 0)."""
    onehot = (
        segment_ids.to(torch.int64)[..., None] == torch.arange(1, slots + 1, dtype=torch.int64)
    ).to(torch.float32)
    sums = torch.einsum("rsv,rsd->rvd", onehot, tokens.to(torch.float32))
    return sums / onehot.sum(1)[..., None].clamp_min(1.0)


class MultiMedVisionTorch(nn.Module):
    """Encoder (``patch_embed``, ``blocks``, ``norm``) + ``projector``.

    ``model(batch)`` -> ``(embeddings [R, V, d], projections [R, V, k])``; ``batch`` is a
    PackedBatch (numpy or torch fields). ``attn_impl`` = ``"varlen"`` | ``"mask"``.
    """

    def __init__(
        self,
        width=192,
        depth=12,
        heads=3,
        mlp_ratio=4,
        patch=PATCH,
        rope_base=10_000.0,
        proj_hidden=2048,
        proj_dim=128,
        proj_layers=3,
        proj_norm="batch",
        eps=1e-6,
        attn_impl="varlen",
    ):
        super().__init__()
        self.width, self.heads, self.rope_base, self.attn_impl = width, heads, rope_base, attn_impl
        self.patch_embed = PatchEmbed(width, patch)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=eps)
        self.projector = Projector(width, proj_hidden, proj_dim, proj_layers, eps, proj_norm)
        self.init_weights()

    @classmethod
    def from_variant(cls, variant: str = "Ti/14", **kw) -> MultiMedVisionTorch:
        name, patch = variant.split("/")
        width, depth, heads = VARIANTS[name]
        kw.setdefault("depth", depth)
        return cls(width=width, heads=heads, patch=int(patch), **kw)

    def init_weights(self):
        """Truncated normal (+-2 sigma) with std 1/sqrt(fan_in) for matrices, zero biases,
        unit norms (the JAX initialiser's distribution)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                fan_in = m.weight[0].numel()
                with torch.no_grad():
                    nn.init.trunc_normal_(m.weight, std=1.0, a=-2.0, b=2.0).div_(math.sqrt(fan_in))
                    m.bias.zero_()

    def tokens(
        self,
        patches,
        segment_ids,
        coords,
        layout: SegmentLayout | None = None,
        impl: str | None = None,
    ) -> torch.Tensor:
        layout = layout or SegmentLayout.from_segment_ids(segment_ids)
        impl = impl or self.attn_impl
        x = self.patch_embed(_t(patches, torch.float32))
        cos, sin = rope_tables(_t(coords, torch.float32), self.width // self.heads, self.rope_base)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, 3n] for [B, H, S, D]
        for blk in self.blocks:
            x = blk(x, cos, sin, layout, impl)
        return self.norm(x)

    def encode(self, batch, impl: str | None = None) -> torch.Tensor:
        seg = _t(batch.segment_ids, torch.int64)
        tok = self.tokens(batch.patches, seg, batch.coords, impl=impl)
        return pool_views(tok, seg, int(np.shape(batch.view_sample)[-1]))

    def forward(self, batch, impl: str | None = None):
        emb = self.encode(batch, impl)
        return emb, self.projector(emb, _t(batch.view_sample) >= 0)
