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
from mmv_jax.errors import ConfigError
from mmv_jax.kernels.attention import resolve_impl, resolve_platform, segment_attention
from mmv_jax.model import ops
from mmv_jax.model.axes import constrain, current_mesh, shard_map_over
from mmv_jax.model.rope import apply_rope, pairs_per_axis, rope_tables

VARIANTS = {  # width, depth, heads (MLP 4x), ViT-Ti/S/B
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
}


# "none" or a jax.checkpoint_policies name: what each block keeps for its backward pass
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    width: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: int = 4
    patch: int = PATCH
    rope_base: float = 10_000.0
    dtype: str = "float32"
    remat_policy: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = False  # one lax.scan over the blocks: compiles the block body once
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
        raise ConfigError(
            f"config.model.variant must be one of {[v + '/14' for v in VARIANTS]}, got {variant!r}"
        ) from None
    policy = overrides.get("remat_policy", "none")
    if policy not in REMAT_POLICIES:
        raise ConfigError(
            f"config.model.remat_policy must be one of {REMAT_POLICIES}, got {policy!r}"
        )
    return dataclasses.replace(
        EncoderConfig(width=width, depth=depth, heads=heads, patch=patch), **overrides
    )


def _init(key, shape, fan_in):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) / math.sqrt(fan_in)


def param(value, *axes):
    return nnx.Param(value, logical_axes=tuple(axes))


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = param(jnp.ones((dim,), jnp.float32), "embed")
        self.bias = param(jnp.zeros((dim,), jnp.float32), "embed")
        self.eps = eps

    def __call__(self, x):
        return ops.for_platform().layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Dense(nnx.Module):
    """``y = x @ W + b`` with named axes for ``W`` (``in_axis``, ``out_axis``)."""

    def __init__(self, din: int, dout: int, in_axis, out_axis, *, rngs: nnx.Rngs):
        self.kernel = param(_init(rngs.params(), (din, dout), din), in_axis, out_axis)
        self.bias = param(jnp.zeros((dout,), jnp.float32), out_axis)

    def __call__(self, x):
        return ops.for_platform().matmul(x, self.kernel[...].astype(x.dtype)) + self.bias[
            ...
        ].astype(x.dtype)


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
        platform = resolve_platform(current_mesh())
        dt, matmul = x.dtype, ops.for_platform(platform).matmul
        qkv = matmul(x, self.qkv[...].astype(dt)) + self.qkv_bias[...].astype(dt)  # [B, S, 3, H, K]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "heads", None))
        # "auto" follows the platform of the mesh the step is traced for (a TPU topology
        # compiled ahead of time on a CPU gets the TPU kernel), else the default backend
        impl = resolve_impl(self.cfg.attention_impl, platform=platform)
        attend = functools.partial(
            segment_attention, impl=impl, max_segment_len=self.cfg.max_segment_len
        )
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
        h = constrain(
            jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False), ("batch", "seq", "mlp")
        )
        return constrain(x + self.fc2(h), ("batch", "seq", "embed"))


class Encoder(nnx.Module):
    """``Encoder(cfg, rngs=...)(batch)`` -> per-view embeddings ``[R, V, d]`` (fp32)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p3 = cfg.patch**3
        self.patch_embed = Dense(p3, cfg.width, None, "embed", rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width, cfg.ln_eps)

    def embed_patches(self, patches):
        """``[R, S, P^3]`` or (2D-only bucket) ``[R, S, P^2]`` -> ``[R, S, d]``."""
        p2, p3 = self.cfg.patch**2, self.cfg.patch**3
        dt = jnp.dtype(self.cfg.dtype)
        kernel = self.patch_embed.kernel[...]
        if patches.shape[-1] == p2:
            kernel = kernel[:p2]  # depth slice 0 of the cube: the 2D shortcut
        elif patches.shape[-1] != p3:
            raise ValueError(
                f"patches must have {p3} (P^3) or {p2} (P^2, 2D only) entries, "
                f"got {patches.shape[-1]}"
            )
        if patches.dtype == jnp.uint8:  # the uint8 wire format: [-1, 1] in 255 levels
            patches = patches.astype(jnp.float32) / 127.5 - 1.0
        x = ops.for_platform().matmul(
            patches.astype(dt), kernel.astype(dt)
        ) + self.patch_embed.bias[...].astype(dt)
        return constrain(x, ("batch", "seq", "embed"))

    def tokens(self, batch: PackedBatch):
        """Final-norm token features ``[R, S, d]`` in the compute dtype."""
        x = self.embed_patches(batch.patches)
        cos, sin = rope_tables(batch.coords, self.cfg.head_dim, self.cfg.rope_base)
        seg = batch.segment_ids.astype(jnp.int32)
        return self.norm(self._blocks(x, cos, sin, seg))

    def _blocks(self, x, cos, sin, seg):
        def run(block, x):
            return block(x, cos, sin, seg)

        if self.cfg.remat_policy != "none":  # recompute what the policy does not keep, in backward
            run = nnx.remat(run, policy=getattr(jax.checkpoint_policies, self.cfg.remat_policy))
        if not self.cfg.scan_layers:
            for block in self.blocks:
                x = run(block, x)
            return x
        # The parameter tree stays one module per block (checkpoints, conversion and export do
        # not see this option): the blocks' states are stacked for the scan at trace time.
        graphdef = nnx.graphdef(self.blocks[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in self.blocks))
        x, _ = jax.lax.scan(lambda x, st: (run(nnx.merge(graphdef, st), x), None), x, stacked)
        return x

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
