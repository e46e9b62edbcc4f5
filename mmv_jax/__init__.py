"""mmv_jax: MultiMedVision in JAX (one SparseMedicalViT for chest X-rays and CT, LeJEPA).

Python API (:mod:`mmv_jax.api`)::

    import mmv_jax
    enc = mmv_jax.load_encoder("runs/stage3")     # a run, run/checkpoints/N or an mmv-export folder
    z = enc.embed(["a.dcm", "ct.nii.gz"])         # [2, D] numpy

Importing ``mmv_jax`` imports neither JAX nor torch (Grain workers import ``mmv_jax.data``,
numpy only); ``load_encoder`` and ``Encoder`` load :mod:`mmv_jax.api` on first use.
"""

__all__ = ["load_encoder", "Encoder"]


def load_encoder(path, step=None, **kwargs):
    """See :func:`mmv_jax.api.load_encoder`."""
    from mmv_jax.api import load_encoder as _load

    return _load(path, step, **kwargs)


def __getattr__(name):
    if name == "Encoder":
        from mmv_jax.api import Encoder

        return Encoder
    raise AttributeError(f"module 'mmv_jax' has no attribute {name!r}")
