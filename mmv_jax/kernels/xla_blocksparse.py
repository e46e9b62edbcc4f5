"""Segment-masked attention in plain XLA, block-sparse over data-dependent block pairs: the
``impl="xla"`` path (CPU, and anywhere no kernel applies). The definition it must equal is
``kernels/reference.py``.

Dense masked attention over a packed row of S tokens spends S^2 work where only the sum of
squared segment lengths is useful. The row is cut into blocks of ``b`` tokens (``G = B * nq``
blocks over the batch). Query block ``i`` can only see keys of the segment ids it holds, and
those lie inside the hull ``[min first(id), max last(id)]`` over its ids: a contiguous range of
key blocks. The ranges are computed from ``segment_ids`` at run time (one sort of the row), laid
out as one flat list of (query block, key block) pairs over the whole batch; each pair's logits
``[H, b, b]`` are masked by segment equality, the softmax runs across the pairs of each query
block (segment max / sum), and the outputs are summed back per query block. The pairs are
visited in chunks of a few (a ``fori_loop``, see :func:`_chunk`) so that each chunk's operands
stay in cache; the forward keeps a running row max (online softmax, one pass). A
``jax.custom_vjp`` keeps only ``q, k, v, out`` and the per-row log-sum-exp and recomputes the
probabilities in the backward pass (flash style).

Static shapes with exact results for every layout: the pair list has room for the whole band
of key blocks ``i - m .. i + m`` of every query block (``m = ceil((L - 1) / b)`` for
``max_segment_len`` L; the whole row without it), which holds the hull of any row whose ids span
at most L tokens, and the loops run over the live pairs only (a run-time trip count). The bound
is a promise about the data that the data may break (a whole CT embedded by a 2D-only run):
:func:`segment_attention_xla` checks it at run time and takes the unbounded pair list when any
id spans more than L tokens (``lax.cond``: correct attention, at the cost of no bound), as the
Pallas kernel does; the Triton kernel needs no bound.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from mmv_jax.kernels.blocks import check_qkv

NEG = -1e30


def halo_blocks(seq_len: int, max_segment_len: int | None, block: int) -> int:
    """Key blocks a segment of at most ``max_segment_len`` tokens reaches beyond its query block."""
    nq = math.ceil(seq_len / block)
    if max_segment_len is None:
        return nq - 1
    return min(math.ceil(max(max_segment_len - 1, 0) / block), nq - 1)


def _id_spans(seg):
    """first / last position of each token's segment id in its row (any layout): ``[B, P]``."""
    bsz, p = seg.shape
    order = jnp.argsort(seg, axis=1, stable=True)
    sid = jnp.take_along_axis(seg, order, axis=1)
    idx = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (bsz, p))
    change = sid[:, 1:] != sid[:, :-1]
    is_first = jnp.concatenate([jnp.ones((bsz, 1), bool), change], axis=1)
    is_last = jnp.concatenate([change, jnp.ones((bsz, 1), bool)], axis=1)
    g_first = lax.cummax(jnp.where(is_first, idx, 0), axis=1)
    g_last = lax.cummin(jnp.where(is_last, idx, p - 1), axis=1, reverse=True)
    first_sorted = jnp.take_along_axis(order, g_first, axis=1)  # stable sort: ascending positions
    last_sorted = jnp.take_along_axis(order, g_last, axis=1)
    rows = jnp.arange(bsz)[:, None]
    first = jnp.zeros_like(seg).at[rows, order].set(first_sorted.astype(seg.dtype))
    last = jnp.zeros_like(seg).at[rows, order].set(last_sorted.astype(seg.dtype))
    return first, last


def block_pairs(lo, count, nq: int, cap: int):
    """Flat pair list from per-block key ranges ``lo, count [G]``: query block, key block, valid,
    and the number of live pairs (they come first)."""
    g = lo.shape[0]
    csum = jnp.cumsum(count)
    start = csum - count
    p = jnp.arange(cap, dtype=csum.dtype)
    qi = jnp.minimum(jnp.searchsorted(csum, p, side="right", method="compare_all"), g - 1)
    valid = p < csum[-1]
    kj = (qi // nq) * nq + lo[qi] + p - start[qi]
    kj = jnp.where(valid, jnp.clip(kj, 0, g - 1), qi)
    return qi, kj, valid, csum[-1]


def _bmm(spec: str, x, y):
    """Batched matmul over (pair, head): ``einsum`` with fp32 accumulation. The two batch
    dimensions stay separate: XLA:CPU runs the flattened form slower here."""
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _pair_logits(qh, kh, segb, qi, kj, valid):
    """Logits ``[C, H, b, b]`` of the pairs, masked entries pushed to ``NEG`` by one additive
    bias ``[C, 1, b, b]`` (``s + NEG == NEG`` in fp32 for any sane logit)."""
    sq, sk = segb[qi], segb[kj]
    mask = (sq[:, :, None] == sk[:, None, :]) & (sq[:, :, None] > 0) & valid[:, None, None]
    bias = jnp.where(mask, 0.0, NEG)[:, None]
    return _bmm("chqd,chkd->chqk", qh[qi], kh[kj]) + bias


CHUNK_ELEMS = 196_608  # logits per pair chunk: 8 pairs x 6 heads x 64 x 64, 0.8 MB fp32 (~L2)


def _chunk(num_pairs: int, heads: int, block: int) -> int:
    """Pairs per chunk: XLA:CPU's batched 64 x 64 matmuls run several times slower once their
    operands leave the cache, so a chunk's logits are sized to fit in L2; much smaller chunks
    pay the loop's overhead instead."""
    return max(1, min(num_pairs, CHUNK_ELEMS // (heads * block * block)))


def _over_chunks(pairs, heads: int, block: int, body, init):
    """Loop of ``body(qi_c, kj_c, valid_c, carry)`` over the chunks that hold the ``n`` live pairs
    of ``pairs = (qi, kj, valid, n)`` (a run-time trip count: the rest of the capacity costs
    nothing; the list is padded with invalid pairs to a whole number of chunks)."""
    qi, kj, valid, n = pairs
    c = _chunk(qi.shape[0], heads, block)
    pad = -qi.shape[0] % c
    if pad:
        qi, kj = (jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,))]) for x in (qi, kj))
        valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])

    def step(i, carry):
        part = lambda x: lax.dynamic_slice_in_dim(x, i * c, c)
        return body(part(qi), part(kj), part(valid), carry)

    return lax.fori_loop(0, (n + c - 1) // c, step, init)


def _fwd_pairs(qh, kh, vh, segb, pairs):
    """One pass over the pair chunks with a running row max (online softmax). The pairs are
    sorted by query block, so a block's pairs within a chunk are adjacent: the first of them
    rescales the block's sums to the new max (added as ``(alpha - 1) * old``, so one scatter-add
    per sum). A row that has only seen masked keys holds junk (``exp(NEG - NEG) = 1``) that the
    first live key's ``alpha = exp(NEG - max) = 0`` wipes out; rows that never see one are
    dropped at the end."""
    g, h, b, d = qh.shape

    def step(qi, kj, valid, carry):
        mx, den, num = carry
        s = _pair_logits(qh, kh, segb, qi, kj, valid)
        old = mx[qi]
        mx = mx.at[qi].max(s.max(-1), indices_are_sorted=True)
        new = mx[qi]
        first = jnp.concatenate([jnp.ones((1,), bool), qi[1:] != qi[:-1]])[:, None, None]
        rescale = jnp.where(first, jnp.exp(old - new) - 1.0, 0.0)  # alpha - 1, once per block
        e = jnp.exp(s - new[..., None])
        den = den.at[qi].add(rescale * den[qi] + e.sum(-1), indices_are_sorted=True)
        pv = _bmm("chqk,chkd->chqd", e.astype(vh.dtype), vh[kj])
        num = num.at[qi].add(rescale[..., None] * num[qi] + pv, indices_are_sorted=True)
        return mx, den, num

    init = (
        jnp.full((g, h, b), NEG, jnp.float32),
        jnp.zeros((g, h, b), jnp.float32),
        jnp.zeros((g, h, b, d), jnp.float32),
    )
    mx, den, num = _over_chunks(pairs, h, b, step, init)
    live = mx > 0.5 * NEG  # the query sees at least one key
    out = jnp.where(live[..., None], num / jnp.where(live, den, 1.0)[..., None], 0.0)
    lse = jnp.where(live, mx + jnp.log(jnp.where(live, den, 1.0)), 0.0)
    return out, lse


def _bwd_pairs(qh, kh, vh, segb, oh, lse, doh, pairs):
    g, h, b, d = qh.shape
    delta = jnp.einsum("ghqd,ghqd->ghq", doh.astype(jnp.float32), oh)  # see _rowdot (encoder)

    def grads(qi, kj, valid, carry):
        dq, dk, dv = carry
        p = jnp.exp(_pair_logits(qh, kh, segb, qi, kj, valid) - lse[qi][..., None])
        do_p = doh[qi]
        dv = dv.at[kj].add(_bmm("chqk,chqd->chkd", p, do_p))
        ds = p * (_bmm("chqd,chkd->chqk", do_p, vh[kj]) - delta[qi][..., None])
        dq = dq.at[qi].add(_bmm("chqk,chkd->chqd", ds, kh[kj]), indices_are_sorted=True)
        dk = dk.at[kj].add(_bmm("chqk,chqd->chkd", ds, qh[qi]))
        return dq, dk, dv

    zeros = jnp.zeros((g, h, b, d), jnp.float32)
    return _over_chunks(pairs, h, b, grads, (zeros, zeros, zeros))


def key_block_ranges(seg, b: int, m: int):
    """Per query block ``[G]``: the key block range (lo, count) of the hull of its ids, clipped to
    the band ``i - m .. i + m``, which holds the hull of any row whose ids span at most ``m``
    blocks' reach (:func:`segment_attention_xla` sends a batch that breaks this to the unbounded
    computation)."""
    bsz, p = seg.shape
    nq = p // b
    first, last = _id_spans(seg)
    live = seg > 0
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(live, first, big).reshape(bsz, nq, b), axis=-1) // b
    hi = jnp.max(jnp.where(live, last, -1).reshape(bsz, nq, b), axis=-1) // b
    i = jnp.arange(nq)
    lo = jnp.maximum(lo, i - m)
    count = jnp.where(hi >= 0, jnp.minimum(hi, i + m) - lo + 1, 0)
    flat = lambda x: x.reshape(-1).astype(jnp.int32)
    return flat(jnp.where(hi >= 0, lo, 0)), flat(count)


def _heads_major(t, b: int):
    """``[B, P, H, D]`` -> ``[B * P / b, H, b, D]``: blocks, heads, tokens."""
    bsz, p, h, d = t.shape
    return t.reshape(bsz * p // b, b, h, d).transpose(0, 2, 1, 3)


def _tokens_major(t, bsz: int, s: int):
    """Inverse of :func:`_heads_major`, cropped to ``s`` tokens."""
    g, h, b, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(bsz, g * b // bsz, h, d)[:, :s]


def _geometry(shape, max_segment_len, block):
    """``(block, padded length, halo m, pair capacity)``: the capacity holds the band of every
    query block of the batch (the loops stop after the live pairs)."""
    bsz, s, h, d = shape
    b = min(block, s)
    padded = math.ceil(s / b) * b
    m = halo_blocks(s, max_segment_len, b)
    nq = padded // b
    return b, padded, m, bsz * nq * min(2 * m + 1, nq)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _attention_fwd(q, k, v, segment_ids, max_segment_len, block):
    bsz, s, h, d = q.shape
    b, padded, m, cap = _geometry(q.shape, max_segment_len, block)
    seg = segment_ids.astype(jnp.int32)
    if padded != s:
        extra = [(0, 0), (0, padded - s), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(t, extra) for t in (q, k, v))
        seg = jnp.pad(seg, [(0, 0), (0, padded - s)])
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    qh, kh, vh = (_heads_major(t, b) for t in (q, k, v))
    ranges = key_block_ranges(seg, b, m)
    oh, lse = _fwd_pairs(qh, kh, vh, seg.reshape(-1, b), block_pairs(*ranges, padded // b, cap))
    oh = oh.astype(qh.dtype)
    out = _tokens_major(oh, bsz, s)
    return out, (qh, kh, vh, seg, oh, lse, ranges)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _attention_bwd(max_segment_len, block, res, dout):
    bsz, s, h, d = dout.shape
    b, padded, m, cap = _geometry(dout.shape, max_segment_len, block)
    qh, kh, vh, seg, oh, lse, ranges = res
    if padded != s:
        dout = jnp.pad(dout, [(0, 0), (0, padded - s), (0, 0), (0, 0)])
    doh = _heads_major(dout, b)
    dq, dk, dv = _bwd_pairs(
        qh, kh, vh, seg.reshape(-1, b), oh, lse, doh, block_pairs(*ranges, padded // b, cap)
    )
    dq = dq * (1.0 / math.sqrt(d))
    dq, dk, dv = (_tokens_major(t.astype(qh.dtype), bsz, s) for t in (dq, dk, dv))
    return dq, dk, dv, None  # no gradient for segment_ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, segment_ids, max_segment_len, block):
    return _attention_fwd(q, k, v, segment_ids, max_segment_len, block)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


def segment_attention_xla(
    q, k, v, segment_ids, *, max_segment_len: int | None = None, block: int = 64
):
    """``softmax(q k^T / sqrt(D) + mask) v`` restricted to equal non-zero segment ids.

    q, k, v ``[B, S, H, D]``; segment_ids ``[B, S]``. Padding queries return 0, never NaN,
    in forward and backward. Softmax in fp32. ``max_segment_len`` bounds the key blocks visited
    while every id spans at most that many tokens; otherwise the whole batch takes the
    unbounded computation (the same values, more work).
    """
    _, s, _ = check_qkv("xla", q, k, v, segment_ids)
    b = min(block, s)
    if max_segment_len is None or halo_blocks(s, max_segment_len, b) == math.ceil(s / b) - 1:
        return _attention(q, k, v, segment_ids, None, block)
    first, last = _id_spans(segment_ids.astype(jnp.int32))
    span = jnp.max(jnp.where(segment_ids > 0, last - first + 1, 0))
    run = lambda bound: lambda *a: _attention(*a, bound, block)
    return lax.cond(span <= max_segment_len, run(max_segment_len), run(None), q, k, v, segment_ids)
