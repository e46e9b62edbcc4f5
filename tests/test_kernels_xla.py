import numpy as np
import jax
import jax.numpy as jnp
import pytest

from mmv_jax.kernels.attention import resolve_impl, segment_attention
from mmv_jax.kernels.xla import band_geometry, segment_attention_xla


def naive(q, k, v, seg):
    """Per-segment softmax loop in float64 numpy."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for s in set(seg[b].tolist()) - {0}:
            idx = np.flatnonzero(seg[b] == s)
            logits = np.einsum("qhd,khd->hqk", q[b, idx], k[b, idx]) / np.sqrt(q.shape[-1])
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, idx] = np.einsum("hqk,khd->qhd", p, v[b, idx])
    return out


def layout(lengths, total):
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(total - sum(lengths))])
    return ids.astype(np.int32)


ROWS = np.stack([
    layout([1, 37, 64, 5, 1, 20, 70], 256),   # one-token segments, crossing blocks, padding
    layout([256], 256),                        # one segment fills the row
    layout([], 256),                           # a row of only padding
    layout([100, 3, 90], 256),
])


@pytest.mark.parametrize("max_len", [None, 100, 256])
def test_matches_naive_loop_forward_and_grad(max_len):
    key = jax.random.PRNGKey(0)
    lens = ROWS if max_len != 100 else ROWS[[0, 2, 3]]
    seg = jnp.asarray(lens)
    q, k, v = jax.random.normal(key, (3, seg.shape[0], seg.shape[1], 2, 16))
    out = segment_attention_xla(q, k, v, seg, max_segment_len=max_len, block=32)
    np.testing.assert_allclose(out, naive(q, k, v, np.asarray(seg)), atol=1e-5)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)

    w = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    f = lambda q, k, v: jnp.sum(segment_attention_xla(q, k, v, seg, max_segment_len=max_len, block=32) * w)
    grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    # reference gradient: per-segment dense attention written independently
    def ref(q, k, v):
        mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        logits = jnp.where(mask[:, None], logits, -jnp.inf)
        p = jax.nn.softmax(jnp.where(mask[:, None].any(-1, keepdims=True), logits, 0.0), -1)
        p = jnp.where(mask[:, None], p, 0.0)
        return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", p, v) * w)
    for g, r in zip(grads, jax.grad(ref, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_band_skips_blocks_and_poisons_overlong_segments():
    b, m, padded = band_geometry(4096, 256, 64)
    assert (b, m, padded) == (64, 4, 4096)  # 9 key blocks of 64 per query block, not 64
    assert band_geometry(256, None, 64) == (256, 0, 256)
    seg = jnp.asarray(ROWS[:2])  # row 1 holds a 256-token segment
    q = jnp.ones((2, 256, 1, 8))
    out = segment_attention_xla(q, q, q, seg, max_segment_len=70, block=32)
    assert np.isfinite(np.asarray(out[0])).all()
    assert np.isnan(np.asarray(out[1])).all()


def test_dispatcher():
    assert resolve_impl("auto") == "xla"  # tests run on CPU
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cudnn")
    q = jnp.zeros((1, 8, 1, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        segment_attention(q, q, q, jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="interpret"):
        segment_attention(q, q, q, jnp.zeros((1, 8), jnp.int32), impl="xla", interpret=True)
