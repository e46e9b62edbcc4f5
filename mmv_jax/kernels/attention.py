"""Segment-masked attention: one dispatcher over the XLA reference and the TPU/GPU kernels.

``segment_attention(q, k, v, segment_ids, *, impl="auto", interpret=False)``: q, k, v
``[B, S, H, D]``; segment_ids ``[B, S]`` int32, 0 = padding. A query attends only to keys with
the same non-zero segment id; padding query rows return zeros. ``impl="auto"`` picks by
``jax.default_backend()``: ``pallas_tpu`` on TPU, ``triton_gpu`` on CUDA GPUs, ``xla`` elsewhere.
An impl that cannot honour a request raises ``ValueError``; there is no silent fallback.

``max_segment_len`` (optional, an addition to the contract) is a promise that no segment is
longer: the XLA reference and the Pallas kernel then visit only the key blocks a segment can
reach. The promise is checked at run time and every impl gives correct attention when the data
break it (XLA and Pallas switch to their unbounded computation with ``lax.cond``; Triton needs
no bound), so an over-long segment costs time, never a wrong value or a NaN. The kernels also skip
blocks by their per-block segment ranges. Mosaic and Triton kernels are not auto-partitioned:
under a mesh, call them inside ``shard_map`` (the encoder does).
"""
from __future__ import annotations

import jax

IMPLS = ("auto", "xla", "pallas_tpu", "triton_gpu")


def resolve_impl(impl: str = "auto") -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas_tpu"
    if backend in ("gpu", "cuda"):
        return "triton_gpu"
    return "xla"


def segment_attention(q, k, v, segment_ids, *, impl: str = "auto", interpret: bool = False,
                      max_segment_len: int | None = None):
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [B, S] = {q.shape[:2]}, got {segment_ids.shape}")
    impl = resolve_impl(impl)
    if interpret and impl != "pallas_tpu":
        raise ValueError(f"interpret=True applies to impl='pallas_tpu' only, not {impl!r}")
    if impl == "xla":
        from mmv_jax.kernels.xla import segment_attention_xla
        return segment_attention_xla(q, k, v, segment_ids, max_segment_len=max_segment_len)
    if impl == "pallas_tpu":
        from mmv_jax.kernels.pallas_tpu import segment_attention_pallas
        return segment_attention_pallas(q, k, v, segment_ids, interpret=interpret,
                                        max_segment_len=max_segment_len)
    from mmv_jax.kernels.triton_gpu import segment_attention_triton
    return segment_attention_triton(q, k, v, segment_ids)
