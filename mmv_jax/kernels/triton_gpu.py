"""Triton GPU kernel: segment-masked flash attention over packed rows, with block skipping.

Entry point: `segment_attention_triton(q, k, v, segment_ids)`, q, k, v `[B, S, H, D]`,
segment_ids `[B, S]` int32 (0 = padding); same semantics as `kernels/attention.py`.
Forward and backward (dQ kernel + dK/dV kernel, no atomics) are `@triton.jit` functions
launched through jax-triton's `triton_call` and tied by `jax.custom_vjp`. Inputs bf16, fp16 or
fp32; fp32 accumulation (fp32 matmuls in IEEE precision, not TF32). Head dim 64 or 128.

Block skipping: per-block segment-id ranges give, per q-block (per k-block for dK/dV), the
span of blocks whose ranges overlap (`kernels.blocks.block_metadata`); each program
loops over its span only, so the work follows sum(len_i^2), not S^2. For the packer's rows
(contiguous segments, ids increasing along the row) the span is exactly the set of overlapping
blocks; for other rows blocks inside the span are computed fully masked (still correct). The
loop body has no data-dependent branch, so Triton can software-pipeline its loads. The kernels
read [B, S, H, D] directly through strides (no transposes). jax-triton custom calls are not
auto-partitioned: under a mesh, call this inside `jax.shard_map` with the batch sharded.

The `@triton.jit` functions hold no launch code: tests run the very same functions under
Triton's interpreter (TRITON_INTERPRET=1, CPU torch tensors). jax-triton is imported lazily
(it needs a CUDA jaxlib plugin to import), and both its 0.3.x (`out_shape=`) and 0.4.x
(`out_type=`) `triton_call` are supported.

Constraints (ValueError otherwise): S a multiple of SEQ_MULTIPLE (128); D in HEAD_DIMS.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

from mmv_jax.batch import SEQ_MULTIPLE
from mmv_jax.kernels.blocks import block_metadata, check_qkv

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = e
else:
    _TRITON_IMPORT_ERROR = None

BLOCK_M = 128  # forward q-block
BLOCK_N = 64  # forward k-block
BLOCK_M_BWD = 64  # backward q-block
BLOCK_N_BWD = 64  # backward k-block
HEAD_DIMS = (64, 128)

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
NUM_STAGES = 2


def num_warps(head_dim: int) -> int:
    """4 warps for D=64; 8 for D=128 (the fp32 accumulators would spill with 4)."""
    return 4 if head_dim <= 64 else 8


def check_supported(q, k, v, segment_ids):
    """Raise ValueError naming the constraint a request breaks."""
    _, s, d = check_qkv("triton_gpu", q, k, v, segment_ids, SUPPORTED_DTYPES)
    if d not in HEAD_DIMS:
        raise ValueError(f"triton_gpu: head dim D={d} must be one of {HEAD_DIMS}")
    if s % SEQ_MULTIPLE:
        raise ValueError(
            f"triton_gpu: sequence length S={s} must be a multiple of {SEQ_MULTIPLE} "
            f"(pack into buckets whose length is a multiple of {SEQ_MULTIPLE})"
        )


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b accumulated in fp32; fp32 inputs multiply in IEEE precision, not TF32 (the
        precision fp32 callers ask for). The branch is resolved at compile time."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _program(
        STARTS,
        ENDS,
        SEQ: tl.constexpr,
        NHEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """This program's block (grid axis 0 runs over the blocks of a row, axis 1 over B * H):
        ``(batch, batch * H + head, offset of that (batch, head) in a [B, S, H, D] array, the
        block's token offsets, the first and the last block of the other side it meets)``."""
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // NHEADS
        base = b * SEQ * NHEADS * HEAD_DIM + (pid_bh % NHEADS) * HEAD_DIM
        i = b * (SEQ // BLOCK) + pid
        return (
            b,
            pid_bh,
            base,
            pid * BLOCK + tl.arange(0, BLOCK),
            tl.load(STARTS + i),
            tl.load(ENDS + i),
        )

    @triton.jit
    def _rows(base, offs, NHEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Offsets of the tokens ``offs`` of one (batch, head) of a [B, S, H, D] array."""
        return base + offs[:, None] * (NHEADS * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :]

    @triton.jit
    def _load_pair(
        X, Y, SEG, b, base, offs, SEQ: tl.constexpr, NHEADS: tl.constexpr, HEAD_DIM: tl.constexpr
    ):
        """The tokens ``offs`` of X and Y (k and v, or q and dO) and their segment ids, and
        the offsets they were read at."""
        ptrs = _rows(base, offs, NHEADS, HEAD_DIM)
        return ptrs, tl.load(X + ptrs), tl.load(Y + ptrs), tl.load(SEG + b * SEQ + offs)

    @triton.jit
    def _load_stats(LSE, DELTA, pid_bh, offs, SEQ: tl.constexpr):
        """The forward's logsumexp and the backward's delta of the queries ``offs``."""
        return tl.load(LSE + pid_bh * SEQ + offs), tl.load(DELTA + pid_bh * SEQ + offs)

    @triton.jit
    def _probs_and_dlogits(
        q, k, v, do, qseg, kseg, lse, delta, SM_SCALE: tl.constexpr, IEEE: tl.constexpr
    ):
        """Backward of a (q-block, k-block) pair: probabilities p and dlogits ds, [BM, BN]."""
        s = _dot(q, tl.trans(k), IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        mask = (qseg[:, None] == kseg[None, :]) & (qseg[:, None] != 0)
        p = tl.where(mask, tl.exp(s * SM_SCALE - lse[:, None]), 0.0)
        return p, p * (dp - delta[:, None])

    # The kernels' signatures keep Triton's argument groups (pointers, then compile-time
    # constants) on a few lines; one argument a line would hide them, hence `fmt: skip`.
    @triton.jit
    def _fwd_kernel(Q, K, V, SEG, KSTART, KEND, O, LSE,
                    SM_SCALE: tl.constexpr, SEQ: tl.constexpr, NHEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    IEEE: tl.constexpr):  # fmt: skip
        """One program: a BM-row q-block of one (batch, head); walks its span of k-blocks."""
        b, pid_bh, base, offs_m, kstart, kend = _program(KSTART, KEND, SEQ, NHEADS, HEAD_DIM, BM)
        q_ptrs = _rows(base, offs_m, NHEADS, HEAD_DIM)
        q = tl.load(Q + q_ptrs)
        qseg = tl.load(SEG + b * SEQ + offs_m)
        m_i = tl.zeros([BM], dtype=tl.float32) - 1e30
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, HEAD_DIM], dtype=tl.float32)
        for kb in range(kstart, kend + 1):
            _, k, v, kseg = _load_pair(
                K, V, SEG, b, base, kb * BN + tl.arange(0, BN), SEQ, NHEADS, HEAD_DIM
            )
            s = _dot(q, tl.trans(k), IEEE) * SM_SCALE
            mask = (qseg[:, None] == kseg[None, :]) & (qseg[:, None] != 0)
            s = tl.where(mask, s, -1e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.where(mask, tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = _dot(p.to(v.dtype), v, IEEE)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + q_ptrs, out.to(O.dtype.element_ty))
        lse = tl.where(has, m_i + tl.log(l_safe), 0.0)
        tl.store(LSE + pid_bh * SEQ + offs_m, lse)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, SEG, KSTART, KEND, DO, LSE, DELTA, DQ,
                       SM_SCALE: tl.constexpr, SEQ: tl.constexpr, NHEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       IEEE: tl.constexpr):  # fmt: skip
        """One program: dQ of a BM-row q-block; walks its span of k-blocks."""
        b, pid_bh, base, offs_m, kstart, kend = _program(KSTART, KEND, SEQ, NHEADS, HEAD_DIM, BM)
        q_ptrs, q, do, qseg = _load_pair(Q, DO, SEG, b, base, offs_m, SEQ, NHEADS, HEAD_DIM)
        lse, delta = _load_stats(LSE, DELTA, pid_bh, offs_m, SEQ)
        dq = tl.zeros([BM, HEAD_DIM], dtype=tl.float32)
        for kb in range(kstart, kend + 1):
            _, k, v, kseg = _load_pair(
                K, V, SEG, b, base, kb * BN + tl.arange(0, BN), SEQ, NHEADS, HEAD_DIM
            )
            _, ds = _probs_and_dlogits(q, k, v, do, qseg, kseg, lse, delta, SM_SCALE, IEEE)
            dq += _dot(ds.to(k.dtype), k, IEEE)
        dq = dq * SM_SCALE
        tl.store(DQ + q_ptrs, dq.to(DQ.dtype.element_ty))

    @triton.jit
    def _bwd_dkv_kernel(Q, K, V, SEG, QSTART, QEND, DO, LSE, DELTA, DK, DV,
                        SM_SCALE: tl.constexpr, SEQ: tl.constexpr, NHEADS: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        IEEE: tl.constexpr):  # fmt: skip
        """One program: dK, dV of a BN-row k-block; walks its span of q-blocks."""
        b, pid_bh, base, offs_n, qstart, qend = _program(QSTART, QEND, SEQ, NHEADS, HEAD_DIM, BN)
        kv_ptrs, k, v, kseg = _load_pair(K, V, SEG, b, base, offs_n, SEQ, NHEADS, HEAD_DIM)
        dk = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
        for qb in range(qstart, qend + 1):
            offs_m = qb * BM + tl.arange(0, BM)
            _, q, do, qseg = _load_pair(Q, DO, SEG, b, base, offs_m, SEQ, NHEADS, HEAD_DIM)
            lse, delta = _load_stats(LSE, DELTA, pid_bh, offs_m, SEQ)
            p, ds = _probs_and_dlogits(q, k, v, do, qseg, kseg, lse, delta, SM_SCALE, IEEE)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        dk = dk * SM_SCALE
        tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty))


# ----------------------------------------------------------------------------- jax-triton glue


def _jax_triton():
    if triton is None:
        raise ValueError(f"impl='triton_gpu' needs the triton package: {_TRITON_IMPORT_ERROR}")
    try:
        import jax_triton as jt
    except ImportError as e:
        raise ValueError(
            "impl='triton_gpu' needs jax-triton and a CUDA jaxlib "
            f"(pip install jax-triton 'jax[cuda12]'): {e}"
        ) from e
    return jt


@functools.cache
def _out_kwarg(triton_call) -> str:
    """jax-triton 0.3.x names the outputs `out_shape`, 0.4.x `out_type`."""
    params = inspect.signature(triton_call).parameters
    return "out_type" if "out_type" in params else "out_shape"


def _call(kernel, args, outs, grid, *, num_warps, compute_capability=None, **meta):
    jt = _jax_triton()
    kw = {_out_kwarg(jt.triton_call): outs}
    if compute_capability is not None:
        kw["compute_capability"] = compute_capability
    return jt.triton_call(
        *args, kernel=kernel, grid=grid, num_warps=num_warps, num_stages=NUM_STAGES, **kw, **meta
    )


def _meta(q):
    _, s, h, d = q.shape
    return dict(
        SM_SCALE=1.0 / math.sqrt(d),
        SEQ=s,
        NHEADS=h,
        HEAD_DIM=d,
        IEEE=jnp.dtype(q.dtype) == jnp.float32,
    )


def _forward(q, k, v, seg, cc):
    b, s, h, _ = q.shape
    _, _, _, _, kstart, kend, _, _ = block_metadata(seg, BLOCK_M, BLOCK_N)
    o, lse = _call(
        _fwd_kernel,
        (q, k, v, seg, kstart, kend),
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
        (s // BLOCK_M, b * h),
        num_warps=num_warps(q.shape[-1]),
        compute_capability=cc,
        BM=BLOCK_M,
        BN=BLOCK_N,
        **_meta(q),
    )
    return o, lse


def _backward(q, k, v, seg, o, lse, do, cc):
    b, s, h, _ = q.shape
    _, _, _, _, kstart, kend, qstart, qend = block_metadata(seg, BLOCK_M_BWD, BLOCK_N_BWD)
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), o.astype(jnp.float32))
    meta = dict(BM=BLOCK_M_BWD, BN=BLOCK_N_BWD, **_meta(q))
    dq = _call(
        _bwd_dq_kernel,
        (q, k, v, seg, kstart, kend, do, lse, delta),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        (s // BLOCK_M_BWD, b * h),
        num_warps=num_warps(q.shape[-1]),
        compute_capability=cc,
        **meta,
    )
    dk, dv = _call(
        _bwd_dkv_kernel,
        (q, k, v, seg, qstart, qend, do, lse, delta),
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        (s // BLOCK_N_BWD, b * h),
        num_warps=num_warps(q.shape[-1]),
        compute_capability=cc,
        **meta,
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, seg, cc):
    return _forward(q, k, v, seg, cc)[0]


def _attention_fwd(q, k, v, seg, cc):
    o, lse = _forward(q, k, v, seg, cc)
    return o, (q, k, v, seg, o, lse)


def _attention_bwd(cc, res, do):
    q, k, v, seg, o, lse = res
    dq, dk, dv = _backward(q, k, v, seg, o, lse, do, cc)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def segment_attention_triton(q, k, v, segment_ids, *, compute_capability: int | None = None):
    """Segment-masked attention, [B, S, H, D] in and out (see the module docstring).

    `compute_capability` (e.g. 90) pins the Triton compile target; None asks the local GPU.
    Set it to lower/export for CUDA on a machine without a GPU.
    """
    check_supported(q, k, v, segment_ids)
    _jax_triton()  # fail early, with a clear message, when jax-triton is missing
    return _attention(
        q,
        k,
        v,
        segment_ids.astype(jnp.int32),
        None if compute_capability is None else int(compute_capability),
    )
