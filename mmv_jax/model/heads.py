"""Projector head and the full self-supervised model (encoder + projector).

Projector: ``Dense -> norm -> GELU`` repeated, then a final Dense to the projection width.
``norm="batch"`` (default) is the LeJEPA reference's BatchNorm: each hidden unit standardised
over the real views of the whole (global) batch, empty view slots masked out, batch statistics
always (the projector only serves the training loss). ``norm="layer"`` normalises each view on
its own instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmv_jax.batch import PackedBatch, groups
from mmv_jax.errors import ConfigError
from mmv_jax.model.encoder import Dense, Encoder, EncoderConfig, LayerNorm, param


class MaskedBatchNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = param(jnp.ones((dim,), jnp.float32), None)
        self.bias = param(jnp.zeros((dim,), jnp.float32), None)
        self.eps = eps

    def __call__(self, x, mask):
        """``x [..., dim]``, ``mask [...]`` (True = a real view)."""
        w = mask.astype(jnp.float32)[..., None]
        n = jnp.maximum(w.sum(), 1.0)
        axes = tuple(range(x.ndim - 1))
        mean = (x * w).sum(axes) / n
        var = (jnp.square(x - mean) * w).sum(axes) / n
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Projector(nnx.Module):
    """``layers - 1`` times (Dense -> norm -> GELU), then Dense ``out``; ``norm="batch"`` (masked
    BatchNorm over the batch's real views) or ``"layer"``. The defaults live in
    :class:`MultiMedVision` and the config."""

    def __init__(self, din: int, hidden: int, dout: int, layers: int, *, norm: str, rngs: nnx.Rngs):
        if layers < 1:
            raise ConfigError(f"config.model.proj_layers must be >= 1, got {layers}")
        if norm not in ("batch", "layer"):
            raise ConfigError(f"config.model.proj_norm must be 'batch' or 'layer', got {norm!r}")
        dims = [din] + [hidden] * (layers - 1)
        self.hidden = nnx.List(
            [
                Dense(a, b, "embed", "mlp" if i == 0 else None, rngs=rngs)
                for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
            ]
        )
        norm_cls = MaskedBatchNorm if norm == "batch" else LayerNorm
        self.norms = nnx.List([norm_cls(b) for b in dims[1:]])
        self.out = Dense(dims[-1], dout, None, None, rngs=rngs)

    def __call__(self, x, mask):
        for dense, norm in zip(self.hidden, self.norms):
            h = dense(x)
            h = norm(h, mask) if isinstance(norm, MaskedBatchNorm) else norm(h)
            x = jax.nn.gelu(h, approximate=False)
        return self.out(x)


class MultiMedVision(nnx.Module):
    """``model(batch)`` -> ``(embeddings [R, V, d], projections [R, V, k])``, both fp32 (``R``:
    the rows of all groups, in order)."""

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        proj_hidden: int = 2048,
        proj_dim: int = 128,
        proj_layers: int = 3,
        proj_norm: str = "batch",
        rngs: nnx.Rngs,
    ):
        self.encoder = Encoder(cfg, rngs=rngs)
        self.projector = Projector(
            cfg.width, proj_hidden, proj_dim, proj_layers, norm=proj_norm, rngs=rngs
        )

    def __call__(self, batch: PackedBatch | tuple[PackedBatch, ...]):
        """One PackedBatch, or a train batch's row groups: each group runs through the encoder
        on its own (its rows stay on their devices) and the per-view outputs are joined."""
        parts = groups(batch)
        emb = jnp.concatenate([self.encoder(g) for g in parts])
        mask = jnp.concatenate([g.view_sample >= 0 for g in parts])
        return emb, self.projector(emb, mask)
