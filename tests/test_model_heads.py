import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmv_jax.model.heads import MaskedBatchNorm, Projector


def test_masked_batchnorm_uses_only_real_views():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 8)) * 3 + 1
    mask = jnp.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    y = MaskedBatchNorm(8)(x, mask)
    real = np.asarray(y)[np.asarray(mask)]
    np.testing.assert_allclose(real.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(real.std(0), 1, atol=1e-3)
    # garbage in empty slots changes nothing for the real ones
    x2 = x.at[~mask].set(1e6)
    np.testing.assert_allclose(
        np.asarray(MaskedBatchNorm(8)(x2, mask))[np.asarray(mask)], real, atol=1e-5
    )


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_projector_views_meet_only_through_batch_statistics(norm):
    """Batch norm: a view's projection depends on the other real views (their statistics), never
    on empty slots. Layer norm: each view on its own."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 16))
    mask = jnp.array([[1, 1, 0, 1], [1, 1, 1, 0]], bool)
    proj = nnx.jit(lambda p, x, mask: p(x, mask))
    model = Projector(16, 32, 8, 3, norm=norm, rngs=nnx.Rngs(0))
    y = np.asarray(proj(model, x, mask))
    assert y.shape == (2, 4, 8)
    real = np.asarray(mask)
    np.testing.assert_allclose(
        np.asarray(proj(model, x.at[~mask].set(1e3), mask))[real], y[real], atol=1e-5
    )
    y2 = np.asarray(proj(model, x.at[0, 0].multiply(3.0).at[0, 0].add(1.0), mask))
    others = real.copy()
    others[0, 0] = False
    assert not np.allclose(y2[0, 0], y[0, 0], atol=1e-3)
    assert np.allclose(y2[others], y[others], atol=1e-5) == (norm == "layer")


def test_projector_refuses_unknown_settings():
    with pytest.raises(ValueError, match="proj_norm"):
        Projector(16, 32, 8, 3, norm="group", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="proj_layers"):
        Projector(16, 32, 8, 0, norm="batch", rngs=nnx.Rngs(0))
