"""PyTorch reference implementation of MultiMedVision (SparseMedicalViT + projector + LeJEPA).

Written from ``../shared/paper/METHOD.md`` for parity checks, checkpoint conversion and the
PyTorch side of ``tools/bench.py torch``. Parameter names follow the timm ViT layout
(``patch_embed.proj.weight``, ``blocks.N.attn.qkv.weight``, ``blocks.N.mlp.fc1.weight``,
``norm.weight``) plus ``projector.layers.N.*``, ``projector.norms.N.*``, ``projector.out.*``.
Not imported by the ``mmv_jax`` package.
"""
from torch_reference.model import (VARIANTS, MaskedBatchNorm, MultiMedVisionTorch, SegmentLayout, apply_rope,
                                   pool_views, rope_tables, segment_attention)
from torch_reference.lejepa import (epps_pulley, lejepa_loss, prediction_loss, random_directions,
                                    scatter_views, sigreg)

__all__ = ["VARIANTS", "MultiMedVisionTorch", "SegmentLayout", "apply_rope", "pool_views",
           "rope_tables", "segment_attention", "epps_pulley", "lejepa_loss", "prediction_loss",
           "random_directions", "scatter_views", "sigreg"]
