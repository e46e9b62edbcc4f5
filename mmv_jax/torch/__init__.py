"""The PyTorch side of mmv_jax (the ``torch`` extra: ``pip install -e '.[torch]'``).

- :func:`load_encoder` ``(folder)`` -> :class:`TorchEncoder`: an ``mmv-export`` folder as a
  PyTorch encoder whose ``embed(images)`` takes plain image tensors (``[H, W]`` X-rays,
  ``[Z, H, W]`` CT in HU) and preprocesses, packs and embeds them as the JAX encoder does.
- :class:`MultiMedVisionTorch` and the layers (:mod:`mmv_jax.torch.model`), the LeJEPA loss
  (:mod:`mmv_jax.torch.lejepa`): the same model on packed batches, timm-style parameter names,
  for parity checks and for training in PyTorch.
- :mod:`mmv_jax.torch.names`: the JAX <-> timm name and layout map (numpy only).

Importing ``mmv_jax`` never imports torch; this package imports it on first use of a name
below (``mmv_jax.torch.names`` needs no torch at all).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "model": [
        "VARIANTS",
        "MaskedBatchNorm",
        "MultiMedVisionTorch",
        "SegmentLayout",
        "apply_rope",
        "pool_views",
        "rope_tables",
        "segment_attention",
    ],
    "lejepa": [
        "epps_pulley",
        "lejepa_loss",
        "prediction_loss",
        "random_directions",
        "scatter_views",
        "sigreg",
    ],
    "encoder": ["TorchEncoder", "load_encoder"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    # lazy, so that ``mmv_jax.torch.names`` (used by the JAX-side export) imports without torch
    if name in _WHERE:
        try:
            module = importlib.import_module(f"mmv_jax.torch.{_WHERE[name]}")
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            raise ImportError(
                f"mmv_jax.torch.{name} needs PyTorch: pip install 'mmv_jax[torch]' "
                "(or pip install torch)"
            ) from None
        return getattr(module, name)
    raise AttributeError(f"module 'mmv_jax.torch' has no attribute {name!r}")
