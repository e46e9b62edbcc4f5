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
    np.testing.assert_allclose(np.asarray(MaskedBatchNorm(8)(x2, mask))[np.asarray(mask)], real, atol=1e-5)


def test_projector_norms():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 16))
    mask = jnp.ones((2, 4), bool)
    for norm in ("batch", "layer"):
        out = Projector(16, 32, 8, 3, norm=norm, rngs=nnx.Rngs(0))(x, mask)
        assert out.shape == (2, 4, 8) and np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="proj_norm"):
        Projector(16, 32, 8, 3, norm="group", rngs=nnx.Rngs(0))
