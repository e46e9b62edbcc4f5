"""Pallas TPU kernel: segment-masked flash attention over packed rows, with block skipping.

Entry point:
`segment_attention_pallas(q, k, v, segment_ids, *, interpret=False, max_segment_len=None)`,
q, k, v `[B, S, H, D]`, segment_ids `[B, S]` int32 (0 = padding). A query attends only to keys
with its own non-zero segment id; padding query rows return zeros (zero gradients).
Softmax scale 1/sqrt(D). Forward and backward are Pallas kernels tied by `jax.custom_vjp`;
matmuls take the input dtype (bf16 or fp32) and accumulate in fp32.

Block skipping. Packed rows hold contiguous segments, so a (q-block, k-block) pair whose
segment-id ranges do not overlap is fully masked. Per-block ranges (min/max non-zero id) and,
per q-block, the first/last overlapping k-block (`kernels.blocks.block_metadata`) are computed
in JAX and scalar-prefetched into SMEM. The inner grid axis
walks that span: its index map clamps into the span (a repeated block index issues no DMA) and
the body runs only for pairs whose ranges overlap, so compute and HBM traffic follow
sum(len_i^2), not S^2. The dK/dV kernel does the same with q- and k-roles swapped. One program
handles all H heads of its block (the mask is head-independent): grid (B, blocks, steps).
Pass `max_segment_len` (the packer's largest view): the inner axis then has
`span_bound(...)` steps instead of S / block, so even the idle grid steps stop growing with S^2.
The bound is checked at run time: a batch whose spans exceed it runs the unbounded grid instead
(`lax.cond`; correct attention, at the cost of no bound), as the XLA path does.

Constraints (ValueError otherwise): S a multiple of block_q and block_k (default 128: the
packer's bucket lengths are multiples of `SEQ_MULTIPLE`); head dim D <= 128 and a multiple of 8,
or a multiple of 128; dtype float32 or bfloat16. Mosaic kernels are not auto-partitioned: call
this inside `jax.shard_map` with the batch sharded (each device runs the kernel on its rows).
Modelled on jax's splash attention (SegmentIds, lane-replicated row statistics, separate dQ
and dK/dV backward kernels); the block skipping here is data-dependent instead of a static mask.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmv_jax.batch import SEQ_MULTIPLE
from mmv_jax.kernels.blocks import block_metadata, check_qkv

BLOCK_Q = SEQ_MULTIPLE  # default q and k block sizes (tokens)
BLOCK_K = SEQ_MULTIPLE
NUM_LANES = 128

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MASK_VALUE = -1e30  # finite: masked logits never make inf - inf

_SQUEEZED = pl.Squeezed()
_TRANS_B = (((1,), (1,)), ((), ()))


def check_supported(q, k, v, segment_ids, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Raise ValueError naming the constraint a request breaks."""
    _, s, d = check_qkv("pallas_tpu", q, k, v, segment_ids, SUPPORTED_DTYPES)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk <= 0 or blk % NUM_LANES:
            raise ValueError(f"pallas_tpu: {name}={blk} must be a positive multiple of {NUM_LANES}")
        if s % blk:
            raise ValueError(
                f"pallas_tpu: sequence length S={s} must be a multiple of {name}={blk} "
                f"(pack into buckets whose length is a multiple of {SEQ_MULTIPLE})"
            )
    if not ((d <= NUM_LANES and d % 8 == 0) or d % NUM_LANES == 0):
        raise ValueError(
            f"pallas_tpu: head dim D={d} must be <= {NUM_LANES} and a multiple of 8, "
            f"or a multiple of {NUM_LANES}"
        )


# ----------------------------------------------------------------------------- grid steps


def _clamp_step(start, end, j):
    """Block index visited at step j of a span [start, end]: stays put past the end (no DMA)."""
    return jnp.maximum(jnp.minimum(start + j, end), start)


# ----------------------------------------------------------------------------- kernel helpers


def _lanes_to(x, n):
    """Lane-replicated [rows, 128] statistic -> [rows, n]."""
    if n == NUM_LANES:
        return x
    if n < NUM_LANES:
        return x[:, :n]
    return jnp.tile(x, (1, n // NUM_LANES))


def _mask(qseg_ref, kseg_ref, bk):
    qseg = _lanes_to(qseg_ref[...], bk)  # [bq, bk]
    kseg = kseg_ref[...]  # [1, bk]
    return (qseg == kseg) & (qseg != 0)


def _pair_overlaps(qlo, qhi, klo, khi, qi, ki):
    return (qlo[qi] <= khi[ki]) & (klo[ki] <= qhi[qi])


def _q_major_step(qlo, qhi, klo, khi, kstart, kend, *, nq, nk):
    """``(j, run)`` of a program of the grid (B, q-block i, step j) walking k-blocks
    kstart[i]..kend[i]: its step, and whether the k-block it visits is one to compute."""
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * nq + i
    start, end = kstart[row], kend[row]
    kb = _clamp_step(start, end, j)
    return j, (start + j <= end) & _pair_overlaps(qlo, qhi, klo, khi, row, b * nk + kb)


def _probs_and_dlogits(
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, lse_ref, di_ref, do_ref, *, scale, bk, heads
):
    """Backward of a (q-block, k-block) pair, head by head: ``(h, q, k, do, p, ds)`` with the
    probabilities p and dlogits ds of head h, [bq, bk]."""
    mask = _mask(qseg_ref, kseg_ref, bk)
    for h in range(heads):
        q, k, v, do = q_ref[h], k_ref[h], v_ref[h], do_ref[h]
        s = lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32) * scale
        p = jnp.where(mask, jnp.exp(s - _lanes_to(lse_ref[h], bk)), 0.0)
        dp = lax.dot_general(do, v, _TRANS_B, preferred_element_type=jnp.float32)
        yield h, q, k, do, p, p * (dp - _lanes_to(di_ref[h], bk))


def span_bound(block_a: int, block_b: int, max_segment_len: int | None, n_b: int) -> int:
    """Static bound on how many b-blocks one a-block's segments reach (the grid's inner axis).

    Segments of at most L tokens starting or ending in an a-block of `block_a` tokens cover at most
    block_a + 2 (L - 1) tokens, hence at most ceil((block_a + 2 (L - 1)) / block_b) + 1 b-blocks.
    """
    if max_segment_len is None:
        return n_b
    reach = block_a + 2 * (max(int(max_segment_len), 1) - 1)
    return max(1, min(n_b, -(-reach // block_b) + 1))


def _split_refs(refs, n_in: int):
    """A kernel's refs, in the order pallas_call passes them -> (the 8 block-metadata tables of
    :func:`block_metadata`, scalar prefetch: qlo, qhi, klo, khi, kstart, kend, qstart, qend; the
    ``n_in`` input blocks; the outputs then the scratch buffers)."""
    return refs[:8], refs[8 : 8 + n_in], refs[8 + n_in :]


# ----------------------------------------------------------------------------- forward
# Every program handles all H heads of one (row, q-block) (the mask is head-independent), so the
# grid is (B, nq, k-steps): H times fewer grid steps than a per-head grid.


def _fwd_kernel(*refs, scale, nq, nk, bk, heads, steps):
    meta, (q_ref, k_ref, v_ref, qseg_ref, kseg_ref), rest = _split_refs(refs, 5)
    qlo, qhi, klo, khi, kstart, kend, _, _ = meta
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    j, run = _q_major_step(qlo, qhi, klo, khi, kstart, kend, nq=nq, nk=nk)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(run)
    def _compute():
        mask = _mask(qseg_ref, kseg_ref, bk)
        for h in range(heads):
            q, k, v = q_ref[h], k_ref[h], v_ref[h]
            s = lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, _MASK_VALUE)
            m_prev = m_scr[h]  # [bq, 128]
            m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # [bq, 128]
            p = jnp.where(mask, jnp.exp(s - _lanes_to(m_next, bk)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_scr[h] = alpha * l_scr[h] + p.sum(axis=-1, keepdims=True)
            m_scr[h] = m_next
            pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_scr[h] = acc_scr[h] * _lanes_to(alpha, acc_scr.shape[-1]) + pv

    @pl.when(j == steps - 1)
    def _finish():
        for h in range(heads):
            l = l_scr[h]
            has = l > 0.0
            inv = jnp.where(has, 1.0 / jnp.where(has, l, 1.0), 0.0)
            o_ref[h] = (acc_scr[h] * _lanes_to(inv, acc_scr.shape[-1])).astype(o_ref.dtype)
            lse_ref[h] = jnp.where(has, m_scr[h] + jnp.log(jnp.where(has, l, 1.0)), 0.0)


def _seg_operands(segment_ids):
    b, s = segment_ids.shape
    seg = segment_ids.astype(jnp.int32)
    return jnp.broadcast_to(seg[:, :, None], (b, s, NUM_LANES)), seg[:, None, :]


def _block_specs(q_map, kv_map, qseg_map, kseg_map, block_q, block_k, heads, d):
    """The operands' BlockSpecs (q-shaped, k/v-shaped, segment ids, per-row statistics)."""
    sq = _SQUEEZED
    return dict(
        q=pl.BlockSpec((sq, heads, block_q, d), q_map),
        kv=pl.BlockSpec((sq, heads, block_k, d), kv_map),
        qseg=pl.BlockSpec((sq, block_q, NUM_LANES), qseg_map),
        kseg=pl.BlockSpec((sq, 1, block_k), kseg_map),
        row=pl.BlockSpec((sq, heads, block_q, NUM_LANES), q_map),
    )


def _q_major_specs(nq, block_q, block_k, heads, d):
    """Index maps of a grid (B, q-block i, step j) walking k-blocks kstart[i]..kend[i]."""

    def q_map(bi, i, j, *m):
        return bi, 0, i, 0

    def kv_map(bi, i, j, qlo, qhi, klo, khi, kstart, kend, *_):
        return bi, 0, _clamp_step(kstart[bi * nq + i], kend[bi * nq + i], j), 0

    def qseg_map(bi, i, j, *m):
        return bi, i, 0

    def kseg_map(bi, i, j, qlo, qhi, klo, khi, kstart, kend, *_):
        return bi, 0, _clamp_step(kstart[bi * nq + i], kend[bi * nq + i], j)

    return _block_specs(q_map, kv_map, qseg_map, kseg_map, block_q, block_k, heads, d)


def _k_major_specs(nk, block_q, block_k, heads, d):
    """Index maps of a grid (B, k-block kb, step j) walking q-blocks qstart[kb]..qend[kb]."""

    def q_map(bi, kb, j, qlo, qhi, klo, khi, kstart, kend, qstart, qend):
        return bi, 0, _clamp_step(qstart[bi * nk + kb], qend[bi * nk + kb], j), 0

    def kv_map(bi, kb, j, *m):
        return bi, 0, kb, 0

    def qseg_map(bi, kb, j, qlo, qhi, klo, khi, kstart, kend, qstart, qend):
        return bi, _clamp_step(qstart[bi * nk + kb], qend[bi * nk + kb], j), 0

    def kseg_map(bi, kb, j, *m):
        return bi, 0, kb

    return _block_specs(q_map, kv_map, qseg_map, kseg_map, block_q, block_k, heads, d)


def _pallas(
    kernel, name, meta, grid, in_specs, out_specs, scratch_shapes, out_shape, interpret, *args
):
    """``kernel`` over ``grid`` (batch, blocks, steps: the last one walks the other side's
    blocks), with the block metadata ``meta`` as scalar prefetch."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch_shapes,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=name,
    )(*meta, *args)


def _forward(q, k, v, segment_ids, meta, *, block_q, block_k, ksteps, interpret):
    """q, k, v [B, H, S, D] -> (o [B, H, S, D], lse [B, H, S, 128] fp32)."""
    b, h, s, d = q.shape
    nq, nk = s // block_q, s // block_k
    qseg, kseg = _seg_operands(segment_ids)
    sp = _q_major_specs(nq, block_q, block_k, h, d)
    kernel = functools.partial(
        _fwd_kernel, scale=1.0 / math.sqrt(d), nq=nq, nk=nk, bk=block_k, heads=h, steps=ksteps
    )
    o, lse = _pallas(
        kernel,
        "segment_attention_fwd",
        meta,
        (b, nq, ksteps),
        [sp["q"], sp["kv"], sp["kv"], sp["qseg"], sp["kseg"]],
        [sp["q"], sp["row"]],
        [
            pltpu.VMEM((h, block_q, NUM_LANES), jnp.float32),
            pltpu.VMEM((h, block_q, NUM_LANES), jnp.float32),
            pltpu.VMEM((h, block_q, d), jnp.float32),
        ],
        [
            jax.ShapeDtypeStruct((b, h, s, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, s, NUM_LANES), jnp.float32),
        ],
        interpret,
        q,
        k,
        v,
        qseg,
        kseg,
    )
    return o, lse


# ----------------------------------------------------------------------------- backward


def _dq_kernel(*refs, scale, nq, nk, bk, heads, steps):
    meta, ins, (dq_ref, dq_scr) = _split_refs(refs, 8)
    qlo, qhi, klo, khi, kstart, kend, _, _ = meta
    j, run = _q_major_step(qlo, qhi, klo, khi, kstart, kend, nq=nq, nk=nk)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(run)
    def _compute():
        for h, _, k, _, _, ds in _probs_and_dlogits(*ins, scale=scale, bk=bk, heads=heads):
            dq_scr[h] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, nq, nk, bk, heads, steps):
    meta, ins, (dk_ref, dv_ref, dk_scr, dv_scr) = _split_refs(refs, 8)
    qlo, qhi, klo, khi, _, _, qstart, qend = meta
    b, kb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # axis 1 walks k-blocks
    col = b * nk + kb
    start, end = qstart[col], qend[col]
    qb = _clamp_step(start, end, j)

    @pl.when(j == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    run = (start + j <= end) & _pair_overlaps(qlo, qhi, klo, khi, b * nq + qb, col)

    @pl.when(run)
    def _compute():
        for h, q, _, do, p, ds in _probs_and_dlogits(*ins, scale=scale, bk=bk, heads=heads):
            dv_scr[h] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dk_scr[h] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(
    q, k, v, segment_ids, meta, o, lse, do, *, block_q, block_k, ksteps, qsteps, interpret
):
    b, h, s, d = q.shape
    nq, nk = s // block_q, s // block_k
    qseg, kseg = _seg_operands(segment_ids)
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    di = jnp.broadcast_to(di, (b, h, s, NUM_LANES))
    scale = 1.0 / math.sqrt(d)
    common = dict(scale=scale, nq=nq, nk=nk, bk=block_k, heads=h)

    args = (q, k, v, qseg, kseg, lse, di, do)
    operands = ("q", "kv", "kv", "qseg", "kseg", "row", "row", "q")
    sp = _q_major_specs(nq, block_q, block_k, h, d)
    dq = _pallas(
        functools.partial(_dq_kernel, steps=ksteps, **common),
        "segment_attention_dq",
        meta,
        (b, nq, ksteps),
        [sp[x] for x in operands],
        sp["q"],
        [pltpu.VMEM((h, block_q, d), jnp.float32)],
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret,
        *args,
    )
    tp = _k_major_specs(nk, block_q, block_k, h, d)
    dk, dv = _pallas(
        functools.partial(_dkv_kernel, steps=qsteps, **common),
        "segment_attention_dkv",
        meta,
        (b, nk, qsteps),
        [tp[x] for x in operands],
        [tp["kv"], tp["kv"]],
        [pltpu.VMEM((h, block_k, d), jnp.float32)] * 2,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret,
        *args,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp


def _steps(segment_ids, block_q, block_k, max_segment_len):
    s = segment_ids.shape[1]
    nq, nk = s // block_q, s // block_k
    return (
        span_bound(block_q, block_k, max_segment_len, nk),
        span_bound(block_k, block_q, max_segment_len, nq),
    )


def _span_ok(meta, ksteps, qsteps):
    """False when a block's span is longer than the static grid walks (max_segment_len broken)."""
    _, _, _, _, kstart, kend, qstart, qend = meta
    return (jnp.max(kend - kstart + 1) <= ksteps) & (jnp.max(qend - qstart + 1) <= qsteps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention_bhsd(q, k, v, segment_ids, block_q, block_k, max_segment_len, interpret):
    return _attention_fwd(q, k, v, segment_ids, block_q, block_k, max_segment_len, interpret)[0]


def _attention_fwd(q, k, v, segment_ids, block_q, block_k, max_segment_len, interpret):
    meta = block_metadata(segment_ids, block_q, block_k)
    ksteps, qsteps = _steps(segment_ids, block_q, block_k, max_segment_len)
    o, lse = _forward(
        q,
        k,
        v,
        segment_ids,
        meta,
        block_q=block_q,
        block_k=block_k,
        ksteps=ksteps,
        interpret=interpret,
    )
    if (
        max_segment_len is not None
    ):  # a segment longer than promised: fail loudly (NaN), not wrongly
        o = jnp.where(_span_ok(meta, ksteps, qsteps), o, jnp.nan).astype(o.dtype)
    return o, (q, k, v, segment_ids, o, lse)


def _attention_bwd(block_q, block_k, max_segment_len, interpret, res, do):
    q, k, v, segment_ids, o, lse = res
    meta = block_metadata(segment_ids, block_q, block_k)
    ksteps, qsteps = _steps(segment_ids, block_q, block_k, max_segment_len)
    dq, dk, dv = _backward(
        q,
        k,
        v,
        segment_ids,
        meta,
        o,
        lse,
        do,
        block_q=block_q,
        block_k=block_k,
        ksteps=ksteps,
        qsteps=qsteps,
        interpret=interpret,
    )
    return dq, dk, dv, None


_attention_bhsd.defvjp(_attention_fwd, _attention_bwd)


def segment_attention_pallas(
    q,
    k,
    v,
    segment_ids,
    *,
    interpret=False,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    max_segment_len: int | None = None,
):
    """Segment-masked attention, [B, S, H, D] in and out (see the module docstring).

    `max_segment_len` (static; the packer's largest view) bounds how many blocks a block's
    segments reach, so the grid walks only that many steps per block instead of S / block — pass
    it: without it the grid is quadratic in S (idle steps issue no DMA and no compute, but each
    still costs a grid step). A batch that breaks the bound runs the unbounded grid (the same
    values, more grid steps).
    """
    check_supported(q, k, v, segment_ids, block_q=block_q, block_k=block_k)
    if max_segment_len is not None and int(max_segment_len) < 1:
        raise ValueError(f"pallas_tpu: max_segment_len must be >= 1 or None, got {max_segment_len}")
    t = lambda x: jnp.swapaxes(x, 1, 2)
    seg = segment_ids.astype(jnp.int32)
    bq, bk, interp = int(block_q), int(block_k), bool(interpret)
    run = lambda bound: lambda *a: _attention_bhsd(*a, bq, bk, bound, interp)
    args = (t(q), t(k), t(v), seg)
    bound = None if max_segment_len is None else int(max_segment_len)
    steps = _steps(seg, bq, bk, bound)
    if bound is None or steps == _steps(seg, bq, bk, None):
        return t(run(None)(*args))
    fits = _span_ok(block_metadata(seg, bq, bk), *steps)
    return t(lax.cond(fits, run(bound), run(None), *args))
