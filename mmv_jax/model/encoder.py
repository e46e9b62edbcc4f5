"""SparseMedicalViT (Flax NNX): one encoder for 2D and 3D inputs packed into one sequence.

patch embed (P^3 -> d; a 2D bucket carrying only depth slice 0 uses the first P^2 rows of the
weight, which equals embedding the zero-padded pseudo-volume) -> pre-norm blocks with 3D RoPE
and segment-masked attention -> final norm -> per-view mean pooling over each segment's tokens.

Parameters are fp32 with logical axis names (``logical_axes`` metadata); compute runs in
``config.dtype`` (bf16 on accelerators, fp32 on CPU tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmv_jax.batch import PATCH, PackedBatch
from mmv_jax.kernels.attention import resolve_impl, resolve_platform, segment_attention
from mmv_jax.model.axes import constrain, current_mesh, shard_map_over
from mmv_jax.model.rope import apply_rope, pairs_per_axis, rope_tables

VARIANTS = {  # width, depth, heads (MLP 4x), ViT-Ti/S/B
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    width: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: int = 4
    patch: int = PATCH
    rope_base: float = 10_000.0
    dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "auto"
    max_segment_len: int | None = None  # lets the XLA attention skip unreachable key blocks
    ln_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def encoder_config(variant: str = "Ti/14", **overrides) -> EncoderConfig:
    """``"Ti/14" | "S/14" | "B/14"`` -> :class:`EncoderConfig` (other fields from ``overrides``)."""
    try:
        name, patch = variant.split("/")
        width, depth, heads = VARIANTS[name]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ValueError(f"config.model.variant must be one of {[v + '/14' for v in VARIANTS]}, "
                         f"got {variant!r}") from None
    return dataclasses.replace(EncoderConfig(width=width, depth=depth, heads=heads, patch=patch),
                               **overrides)


def remat_compiler_options(remat: bool, platform: str) -> dict | None:
    """XLA options a jitted gradient of this encoder needs for remat to take effect on ``platform``.

    ``jax.checkpoint`` keeps XLA's CSE from merging the backward recomputation with the forward
    through optimisation barriers; XLA:CPU strips those barriers (its ``cse_barrier_expander``
    pass) before CSE runs, which silently undoes remat there. Keeping the pass off restores it
    (ViT-S/14 train step, one 8192 row: compiled temp 5.1 GB -> 1.3 GB with remat; without this
    option remat gave 6.4 GB against 5.9 GB)."""
    if remat and platform == "cpu":
        return {"xla_disable_hlo_passes": "cse_barrier_expander"}
    return None


def _init(key, shape, fan_in):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) / math.sqrt(fan_in)


def matmul(x, w):
    """``x [..., din] @ w [din, ...]`` as one 2D matmul: flattening the leading dims keeps the
    weight gradient a canonical matmul (XLA:CPU runs dots with two contracting dims slowly)."""
    lead, din = x.shape[:-1], x.shape[-1]
    y = _matmul2d(x.reshape(-1, din), w.reshape(din, -1))
    return y.reshape(*lead, *w.shape[1:])


def _materialize_on_cpu(t):
    """``t`` as its own buffer on CPU (an optimization barrier), unchanged elsewhere."""
    return jax.lax.platform_dependent(t, cpu=jax.lax.optimization_barrier, default=lambda t: t)


@jax.custom_vjp
def _matmul2d(x, w):
    """``x @ w`` whose input gradient multiplies by a transposed copy of ``w`` on CPU: inside the
    ViT-S/14 step XLA:CPU runs ``g @ w.T`` with the transpose folded into the dot slower than
    the plain ``g @ w_t`` (step 2.24 -> 2.15 s, in-process A/B); the copy is weight-sized."""
    return x @ w


def _matmul2d_fwd(x, w):
    return x @ w, (x, w)


def _matmul2d_bwd(res, g):
    x, w = res
    return g @ _materialize_on_cpu(w.T), x.T @ g


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def param(value, *axes):
    return nnx.Param(value, logical_axes=tuple(axes))


def _rowdot(a, b):
    """``sum(a * b, -1)`` as a contraction (XLA:CPU runs a fused multiply-reduce over the minor axis
    ~25x slower than the equivalent dot)."""
    return jnp.einsum("...d,...d->...", a, b)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis in fp32, output in ``x.dtype``. Its hand-written backward
    saves only ``x`` and two per-token statistics and keeps every reduction a contraction; XLA's
    own derivative of the formula cost ~20 ms per ViT-S/14 norm on a 4096 row on CPU, this ~1 ms."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    return ((xf - mean) * rstd * scale + bias).astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, g):
    x, mean, rstd, scale = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gf = g.astype(jnp.float32)
    g2, xhat2 = gf.reshape(-1, gf.shape[-1]), xhat.reshape(-1, gf.shape[-1])
    dscale = jnp.einsum("nd,nd->d", g2, xhat2)
    dbias = g2.sum(0)
    gs = gf * scale
    n = gf.shape[-1]
    dx = rstd * (gs - _rowdot(gf, scale) / n - xhat * (_rowdot(gs, xhat) / n))
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = param(jnp.ones((dim,), jnp.float32), "embed")
        self.bias = param(jnp.zeros((dim,), jnp.float32), "embed")
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Dense(nnx.Module):
    """``y = x @ W + b`` with named axes for ``W`` (``in_axis``, ``out_axis``)."""

    def __init__(self, din: int, dout: int, in_axis, out_axis, *, rngs: nnx.Rngs):
        self.kernel = param(_init(rngs.params(), (din, dout), din), in_axis, out_axis)
        self.bias = param(jnp.zeros((dout,), jnp.float32), out_axis)

    def __call__(self, x):
        return matmul(x, self.kernel[...].astype(x.dtype)) + self.bias[...].astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        d, h = cfg.width, cfg.heads
        pairs_per_axis(cfg.head_dim)  # raises early when the head cannot hold 3D RoPE
        if d % h:
            raise ValueError(f"width {d} is not divisible by heads {h}")
        self.cfg = cfg
        self.qkv = param(_init(rngs.params(), (d, 3, h, d // h), d), "embed", None, "heads", None)
        self.qkv_bias = param(jnp.zeros((3, h, d // h), jnp.float32), None, "heads", None)
        self.proj = param(_init(rngs.params(), (h, d // h, d), d), "heads", None, "embed")
        self.proj_bias = param(jnp.zeros((d,), jnp.float32), "embed")

    def __call__(self, x, cos, sin, segment_ids):
        dt = x.dtype
        qkv = matmul(x, self.qkv[...].astype(dt)) + self.qkv_bias[...].astype(dt)  # [B, S, 3, H, K]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "heads", None))
        # "auto" follows the platform of the mesh the step is traced for (a TPU topology
        # compiled ahead of time on a CPU gets the TPU kernel), else the default backend
        impl = resolve_impl(self.cfg.attention_impl, platform=resolve_platform(current_mesh()))
        attend = functools.partial(segment_attention, impl=impl, max_segment_len=self.cfg.max_segment_len)
        if impl != "xla":  # Mosaic / Triton kernels run per device with the batch sharded
            qkv_names = ("batch", None, "heads", None)
            attend = shard_map_over(attend, [qkv_names] * 3 + [("batch", None)], qkv_names)
        o = attend(q, k, v, segment_ids)
        h, k = o.shape[-2:]
        out = matmul(o.reshape(*o.shape[:-2], h * k), self.proj[...].astype(dt).reshape(h * k, -1))
        return out + self.proj_bias[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        d, hidden = cfg.width, cfg.width * cfg.mlp_ratio
        self.norm1 = LayerNorm(d, cfg.ln_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(d, cfg.ln_eps)
        self.fc1 = Dense(d, hidden, "embed", "mlp", rngs=rngs)
        self.fc2 = Dense(hidden, d, "mlp", "embed", rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        h = constrain(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False), ("batch", "seq", "mlp"))
        return constrain(x + self.fc2(h), ("batch", "seq", "embed"))


class Encoder(nnx.Module):
    """``Encoder(cfg, rngs=...)(batch)`` -> per-view embeddings ``[R, V, d]`` (fp32)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p3 = cfg.patch ** 3
        self.patch_embed = Dense(p3, cfg.width, None, "embed", rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width, cfg.ln_eps)

    def embed_patches(self, patches):
        """``[R, S, P^3]`` or (2D-only bucket) ``[R, S, P^2]`` -> ``[R, S, d]``."""
        p2, p3 = self.cfg.patch ** 2, self.cfg.patch ** 3
        dt = jnp.dtype(self.cfg.dtype)
        kernel = self.patch_embed.kernel[...]
        if patches.shape[-1] == p2:
            kernel = kernel[:p2]  # depth slice 0 of the cube: the 2D shortcut
        elif patches.shape[-1] != p3:
            raise ValueError(f"patches must have {p3} (P^3) or {p2} (P^2, 2D only) entries, "
                             f"got {patches.shape[-1]}")
        if patches.dtype == jnp.uint8:  # the uint8 wire format: [-1, 1] in 255 levels
            patches = patches.astype(jnp.float32) / 127.5 - 1.0
        x = matmul(patches.astype(dt), kernel.astype(dt)) + self.patch_embed.bias[...].astype(dt)
        return constrain(x, ("batch", "seq", "embed"))

    def tokens(self, batch: PackedBatch):
        """Final-norm token features ``[R, S, d]`` in the compute dtype."""
        x = self.embed_patches(batch.patches)
        cos, sin = rope_tables(batch.coords, self.cfg.head_dim, self.cfg.rope_base)
        seg = batch.segment_ids.astype(jnp.int32)
        for block in self.blocks:
            if self.cfg.remat:  # keep only each block's input; recompute the rest in backward
                graphdef, state = nnx.split(block)
                run = lambda st, x: nnx.merge(graphdef, st)(x, cos, sin, seg)  # noqa: E731
                x = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(state, x)
            else:
                x = block(x, cos, sin, seg)
        return self.norm(x)

    def __call__(self, batch: PackedBatch):
        return pool_views(self.tokens(batch), batch.segment_ids, batch.view_sample.shape[-1])


def pool_views(tokens, segment_ids, slots: int):
    """Mean of each segment's tokens: ``[R, S, d]`` -> ``[R, V, d]`` fp32 (empty slots -> 0)."""
    onehot = jax.nn.one_hot(segment_ids.astype(jnp.int32) - 1, slots, dtype=jnp.float32)
    sums = jnp.einsum("rsv,rsd->rvd", onehot, tokens.astype(jnp.float32))
    counts = onehot.sum(axis=1)[..., None]
    return sums / jnp.maximum(counts, 1.0)


def param_count(module: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
