import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.batch import grid_coords
from mmv_jax.data.patches import make_view
from mmv_jax.model.rope import apply_rope, axis_coords, rope_tables


@pytest.mark.parametrize("g", [1, 2, 5, 16])
def test_axis_coords_formula(g):
    got = axis_coords(g)
    assert got.dtype == np.float32 and got.shape == (g,)
    want = np.array([128.0 * i / max(g - 1, 1) for i in range(g)], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert got[0] == 0 and (g == 1 or got[-1] == 128.0)
    np.testing.assert_allclose(axis_coords(g, alpha=10.0), want / 12.8, atol=1e-5)


def _logits(q, k, coords, head_dim):
    cos, sin = rope_tables(coords, head_dim)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return jnp.einsum("bqhd,bkhd->bhqk", qr, kr)


@pytest.mark.parametrize("head_dim", [64, 32, 8])
def test_logits_depend_only_on_coordinate_difference(head_dim):
    key = jax.random.PRNGKey(0)
    s = 12
    q, k = jax.random.normal(key, (2, 1, s, 2, head_dim))
    coords = jax.random.uniform(jax.random.PRNGKey(1), (1, s, 3), maxval=128.0)
    shift = jnp.array([3.0, -7.5, 40.0])
    a = _logits(q, k, coords, head_dim)
    b = _logits(q, k, coords + shift, head_dim)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    # and they do depend on the coordinates (otherwise the test above is vacuous)
    c = _logits(q, k, coords * 1.5, head_dim)
    assert float(jnp.abs(a - c).max()) > 1e-2


def test_rope_is_rotation_and_leaves_leftover_dims():
    head_dim = 16  # 2 pairs per axis -> 12 rotated dims, 4 pass through
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 1, head_dim))
    coords = jax.random.uniform(jax.random.PRNGKey(3), (1, 5, 3), maxval=128.0)
    y = apply_rope(x, *rope_tables(coords, head_dim))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(y[..., 12:], x[..., 12:])
    np.testing.assert_allclose(apply_rope(x, *rope_tables(jnp.zeros_like(coords), head_dim)), x)


def test_depth_coordinate_of_2d_tokens_is_zero():
    v = make_view(np.ones((1, 70, 98), np.float32), sample=0, is_global=True, index=0)
    assert v.coords.shape == (5 * 7, 3)
    assert np.all(v.coords[:, 0] == 0)
    assert v.coords[:, 1].max() == 128 and v.coords[:, 2].max() == 128
    np.testing.assert_array_equal(grid_coords((1, 5, 7)), v.coords)


def test_head_dim_too_small_raises():
    with pytest.raises(ValueError, match="head_dim"):
        rope_tables(jnp.zeros((1, 2, 3)), 4)
