"""Segment-masked attention: one dispatcher over the XLA path and the TPU/GPU kernels.

``segment_attention(q, k, v, segment_ids, *, impl="auto", platform=None, interpret=False,
max_segment_len=None)``: q, k, v ``[B, S, H, D]``; segment_ids ``[B, S]`` int32, 0 = padding.
A query attends only to keys with the same non-zero segment id; padding query rows return zeros
(the definition: ``kernels/reference.py``). ``impl="auto"`` picks by the platform the
computation is for: ``pallas_tpu`` on TPU, ``triton_gpu`` on CUDA GPUs, ``xla`` elsewhere.
``reference`` is the dense definition itself (S^2 memory; plain autodiff, so forward mode works).
That platform is ``platform`` when given (:func:`resolve_platform` reads it off a mesh), else
that of the abstract mesh in context (``jax.set_mesh``), else ``jax.default_backend()``: so a
step compiled for a TPU topology from a CPU host gets the TPU kernel. An impl that cannot honour
a request raises ``ValueError``; there is no silent fallback.

``max_segment_len`` (optional) is a promise that no segment is longer: the XLA path and the
Pallas kernel then visit only the key blocks a segment can reach. The promise is checked at run
time and every impl gives correct attention when the data break it (XLA and Pallas switch to
their unbounded computation with ``lax.cond``; Triton needs no bound), so an over-long segment
costs time, never a wrong value or a NaN. The kernels also skip blocks by their per-block
segment ranges. Mosaic and Triton kernels are not auto-partitioned: under a mesh, call them
inside ``shard_map`` (the encoder does).
"""

from __future__ import annotations

import jax

from mmv_jax.kernels.reference import segment_attention_reference
from mmv_jax.kernels.xla_blocksparse import segment_attention_xla

IMPLS = ("auto", "xla", "pallas_tpu", "triton_gpu", "reference")
PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")
_AUTO = {"tpu": "pallas_tpu", "gpu": "triton_gpu", "cuda": "triton_gpu"}  # others: "xla"


def resolve_platform(mesh=None) -> str:
    """The platform of ``mesh``'s devices (a ``Mesh`` or an ``AbstractMesh``); without one, of
    the abstract mesh in context; without that, ``jax.default_backend()``."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if isinstance(mesh, jax.sharding.Mesh):
        mesh = mesh.abstract_mesh
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def resolve_impl(impl: str = "auto", *, platform: str | None = None) -> str:
    """The impl ``segment_attention`` runs: ``impl`` itself unless ``"auto"``, which picks by
    ``platform`` (default :func:`resolve_platform`)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"attention platform must be one of {PLATFORMS} or None, got {platform!r}")
    if impl != "auto":
        return impl
    return _AUTO.get(platform or resolve_platform(), "xla")


def segment_attention(
    q,
    k,
    v,
    segment_ids,
    *,
    impl: str = "auto",
    platform: str | None = None,
    interpret: bool = False,
    max_segment_len: int | None = None,
):
    impl = resolve_impl(impl, platform=platform)
    if interpret and impl != "pallas_tpu":
        raise ValueError(f"interpret=True applies to impl='pallas_tpu' only, not {impl!r}")
    if impl == "xla":
        return segment_attention_xla(q, k, v, segment_ids, max_segment_len=max_segment_len)
    if impl == "reference":
        return segment_attention_reference(q, k, v, segment_ids)
    # The kernels are imported on first use: Pallas and Triton cost an import the XLA path
    # never needs.
    if impl == "pallas_tpu":
        from mmv_jax.kernels.pallas_tpu import segment_attention_pallas

        return segment_attention_pallas(
            q, k, v, segment_ids, interpret=interpret, max_segment_len=max_segment_len
        )
    from mmv_jax.kernels.triton_gpu import segment_attention_triton

    return segment_attention_triton(q, k, v, segment_ids)
