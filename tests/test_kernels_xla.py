"""The XLA path (block-sparse pairs) against the dense reference, on packed rows of every kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.kernels.reference import segment_attention_reference as reference
from mmv_jax.kernels.xla_blocksparse import (
    block_pairs,
    halo_blocks,
    key_block_ranges,
    segment_attention_xla,
)


def layout(lengths, total):
    ids = np.concatenate(
        [np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(total - sum(lengths))]
    )
    return ids.astype(np.int32)


ROWS = np.stack(
    [
        layout([1, 37, 64, 5, 1, 20, 70], 256),  # one-token segments, crossing blocks, padding
        layout([256], 256),  # one segment fills the row
        layout([], 256),  # a row of only padding
        layout([100, 3, 90], 256),
    ]
)


@pytest.mark.parametrize("max_len", [None, 100, 256])
def test_matches_reference_forward_and_grad(max_len):
    key = jax.random.PRNGKey(0)
    lens = ROWS if max_len != 100 else ROWS[[0, 2, 3]]
    seg = jnp.asarray(lens)
    q, k, v = jax.random.normal(key, (3, seg.shape[0], seg.shape[1], 2, 16))
    out = segment_attention_xla(q, k, v, seg, max_segment_len=max_len, block=32)
    np.testing.assert_allclose(out, reference(q, k, v, seg), atol=1e-5)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)

    w = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    grads = jax.grad(
        loss(lambda *a: segment_attention_xla(*a, seg, max_segment_len=max_len, block=32)),
        argnums=(0, 1, 2),
    )(q, k, v)
    for g, r in zip(
        grads, jax.grad(loss(lambda *a: reference(*a, seg)), argnums=(0, 1, 2))(q, k, v)
    ):
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_batch_of_only_padding_gives_zeros():
    seg = jnp.zeros((2, 96), jnp.int32)
    q = jax.random.normal(jax.random.PRNGKey(5), (2, 96, 2, 16))
    f = lambda q: segment_attention_xla(q, q, q, seg, max_segment_len=40, block=32)
    out, grad = f(q), jax.grad(lambda q: jnp.sum(f(q) * q))(q)
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(grad) == 0)


def test_bound_limits_the_blocks_and_overlong_segments_stay_correct():
    assert halo_blocks(4096, 256, 64) == 4  # 9 key blocks of 64 per query block, not 64
    assert halo_blocks(4096, None, 64) == 63
    seg = jnp.asarray(ROWS[:2])  # row 1 holds a 256-token segment, over the promised 70
    q, k, v = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 256, 1, 8))
    out = jax.jit(
        lambda q, k, v: segment_attention_xla(q, k, v, seg, max_segment_len=70, block=32)
    )(q, k, v)
    np.testing.assert_allclose(out, reference(q, k, v, seg), atol=1e-5)


# --- block-sparse pairs: hull ranges, non-contiguous ids ----------------------------------------


def random_layout(rng, total, max_len, fill=0.9):
    lengths = []
    while sum(lengths) < fill * total:
        n = int(rng.integers(1, max_len + 1))
        if sum(lengths) + n > total:
            break
        lengths.append(n)
    return layout(lengths, total)


SPARSE_ROWS = np.stack(
    [
        random_layout(np.random.default_rng(1), 192, 40),
        layout(
            [1] * 9 + [15, 17, 16, 1, 33, 40], 192
        ),  # one-token runs, boundaries at 16 and off it
        layout([40, 40, 40, 40, 32], 192),  # a full row of segments at the bound
        layout([], 192),  # only padding
        np.array(
            [1] * 10 + [2] * 10 + [1] * 10 + [0] * 5 + [3] * 20 + [2] * 5 + [0] * 132, np.int32
        ),
    ]
)  # the last row reuses ids 1 and 2 in separate runs (spans 30 and 45 > 40: over the bound)


def test_sparse_pairs_match_dense():
    assert sum(hull_pairs(r, 16).sum() for r in SPARSE_ROWS) == 125
    seg = jnp.asarray(SPARSE_ROWS)
    q, k, v = jax.random.normal(jax.random.PRNGKey(2), (3, *seg.shape, 2, 8))
    w = jax.random.normal(jax.random.PRNGKey(3), q.shape)

    @jax.jit
    def run(q, k, v):
        f = lambda q, k, v: segment_attention_xla(q, k, v, seg, max_segment_len=40, block=16)
        loss = lambda q, k, v: jnp.sum(f(q, k, v) * w)
        ref = lambda q, k, v: jnp.sum(reference(q, k, v, seg) * w)
        return (
            f(q, k, v),
            jax.grad(loss, argnums=(0, 1, 2))(q, k, v),
            jax.grad(ref, argnums=(0, 1, 2))(q, k, v),
        )

    out, grads, g_ref = run(q, k, v)
    want = reference(q, k, v, seg)
    # row 4's ids span more than max_segment_len: the batch takes the unbounded pair list
    np.testing.assert_allclose(out, want, atol=1e-5)
    assert np.all(np.asarray(out)[SPARSE_ROWS == 0] == 0)
    for g, r in zip(grads, g_ref):
        np.testing.assert_allclose(g, r, atol=1e-5)


def hull_pairs(row, b):
    """Pairs one row needs, per query block: the key blocks of the hull of its ids (numpy)."""
    row = np.pad(row, (0, -len(row) % b))
    first = {i: np.flatnonzero(row == i)[0] for i in set(row.tolist()) - {0}}
    last = {i: np.flatnonzero(row == i)[-1] for i in first}
    out = []
    for blk in row.reshape(-1, b):
        ids = set(blk.tolist()) - {0}
        out.append(
            max(last[i] for i in ids) // b - min(first[i] for i in ids) // b + 1 if ids else 0
        )
    return np.array(out)


def test_ranges_are_the_hulls_within_the_band():
    s, b = 256, 16
    rng = np.random.default_rng(0)
    for max_len in (1, 17, 40, None):
        cap = max_len or s
        rows = [random_layout(rng, s, cap, fill=rng.uniform(0.5, 1.0)) for _ in range(32)]
        m = halo_blocks(s, max_len, b)
        for phase in range(0, b, 5):  # segments crossing m boundaries, of the longest length
            n = min((m - 1) * b + 2, cap) if m else 1
            rows.append(np.roll(layout([n] * ((s - phase) // n), s), phase))
        rows = np.stack(rows)
        lo, count = jax.jit(key_block_ranges, static_argnums=(1, 2))(jnp.asarray(rows), b, m)
        count = np.asarray(count).reshape(len(rows), -1)
        np.testing.assert_array_equal(count, np.stack([hull_pairs(r, b) for r in rows]))
        assert count.max() <= 2 * m + 1
        qi, kj, valid, n = block_pairs(
            lo, count.reshape(-1), s // b, len(rows) * (s // b) * (2 * m + 1)
        )
        assert int(n) == count.sum() and np.asarray(valid).sum() == count.sum()
        assert np.all(np.asarray(valid)[: int(n)])  # the live pairs come first


def test_non_contiguous_ids_need_the_band_and_stay_exact():
    # two-token ids 36 apart (span 37 <= 40): every block's hull reaches 4 blocks each way, far
    # more pairs than any row of contiguous segments needs (the whole band)
    pattern = np.zeros(192, np.int32)
    for t in range(192):
        if t % 8 < 4 or pattern[t] == 0:
            pattern[t] = t + 1
            if t % 8 < 4 and t + 36 < 192:
                pattern[t + 36] = t + 1
    assert hull_pairs(pattern, 8).max() == 9  # 4 key blocks each way
    seg = jnp.asarray(pattern[None])
    q, k, v = jax.random.normal(jax.random.PRNGKey(4), (3, 1, 192, 1, 8))
    out = jax.jit(lambda q, k, v: segment_attention_xla(q, k, v, seg, max_segment_len=40, block=8))(
        q, k, v
    )
    np.testing.assert_allclose(out, reference(q, k, v, seg), atol=1e-5)
