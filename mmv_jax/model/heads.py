"""Projector head and the full self-supervised model (encoder + projector).

The LeJEPA reference projector is an MLP with BatchNorm; with packed rows a batch statistic
would couple views across samples, so ours uses LayerNorm: Dense -> LN -> GELU, repeated, then
a final Dense to the projection width.
"""
from __future__ import annotations

import jax
from flax import nnx

from mmv_jax.batch import PackedBatch
from mmv_jax.model.encoder import Dense, Encoder, EncoderConfig, LayerNorm


class Projector(nnx.Module):
    def __init__(self, din: int, hidden: int = 2048, dout: int = 128, layers: int = 3, *,
                 rngs: nnx.Rngs):
        if layers < 1:
            raise ValueError(f"projector layers must be >= 1, got {layers}")
        dims = [din] + [hidden] * (layers - 1)
        self.hidden = nnx.List([Dense(a, b, "embed", "mlp" if i == 0 else None, rngs=rngs)
                                for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        self.norms = nnx.List([LayerNorm(b) for b in dims[1:]])
        self.out = Dense(dims[-1], dout, None, None, rngs=rngs)

    def __call__(self, x):
        for dense, norm in zip(self.hidden, self.norms):
            x = jax.nn.gelu(norm(dense(x)), approximate=False)
        return self.out(x)


class MultiMedVision(nnx.Module):
    """``model(batch)`` -> ``(embeddings [R, V, d], projections [R, V, k])``, both fp32."""

    def __init__(self, cfg: EncoderConfig, *, proj_hidden: int = 2048, proj_dim: int = 128,
                 proj_layers: int = 3, rngs: nnx.Rngs):
        self.encoder = Encoder(cfg, rngs=rngs)
        self.projector = Projector(cfg.width, proj_hidden, proj_dim, proj_layers, rngs=rngs)

    def __call__(self, batch: PackedBatch):
        emb = self.encoder(batch)
        return emb, self.projector(emb)
