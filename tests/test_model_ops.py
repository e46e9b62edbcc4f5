"""The platform seam: CPU gets hand-written backward passes, GPU and TPU plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.mesh import AbstractDevice  # the one way to name a GPU without having one

from mmv_jax.data.packing import pack_into
from mmv_jax.data.patches import make_view
from mmv_jax.model import cpu_ops, ops
from mmv_jax.model.encoder import Encoder, encoder_config


def _close(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_layer_norm_matches_autodiff_of_the_plain_formula(dtype):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = (3 * jax.random.normal(k[0], (2, 33, 48)) + 1).astype(dtype)
    scale, bias = 1 + jax.random.normal(k[1], (48,)), jax.random.normal(k[2], (48,))
    w = jax.random.normal(k[3], x.shape)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    results = []
    for norm in (cpu_ops.layer_norm, ops.layer_norm):
        loss = lambda *a, norm=norm: jnp.sum(norm(*a, 1e-6).astype(jnp.float32) * w)  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, scale, bias))
    (v, g), (v_ref, g_ref) = results
    _close(v, v_ref, tol)
    for a, b in zip(g, g_ref):
        _close(a, b, tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_matmul_matches_autodiff_of_the_product(dtype):
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], (2, 17, 24)).astype(dtype)
    w = jax.random.normal(k[1], (24, 3, 5)).astype(dtype)  # multi-dim output, like qkv
    c = jax.random.normal(k[2], (2, 17, 3, 5))
    ref = lambda x, w: jnp.einsum("bsi,ihk->bshk", x, w)  # noqa: E731
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    results = []
    for f in (cpu_ops.matmul, ops.matmul, ref):
        loss = lambda x, w, f=f: jnp.sum(f(x, w).astype(jnp.float32) * c)  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w))
    for v, g in results[:2]:
        _close(v, results[2][0], tol)
        for a, b in zip(g, results[2][1]):
            _close(a, b, tol)


def _batch():
    rng = np.random.default_rng(0)
    views = [
        make_view(rng.uniform(-1, 1, s).astype(np.float32), sample=i, is_global=True, index=0)
        for i, s in enumerate([(1, 28, 42), (14, 28, 28)])
    ]
    return jax.tree.map(jnp.asarray, pack_into(views, 1, 128, 4))


def _jvp_through_encoder(platform):
    """``jax.jvp`` of the encoder's output in its parameters, traced as for ``platform``."""
    cfg = encoder_config("Ti/14", depth=2, attention_impl="reference")
    graphdef, params = nnx.split(Encoder(cfg, rngs=nnx.Rngs(0)))
    batch = _batch()
    mesh = jax.sharding.AbstractMesh(
        (1,), ("data",), abstract_device=AbstractDevice("test", None, platform)
    )
    with jax.sharding.use_abstract_mesh(mesh):
        assert ops.for_platform() is (cpu_ops.OPS if platform == "cpu" else ops.PLAIN)
        return jax.jvp(lambda p: nnx.merge(graphdef, p)(batch), (params,), (params,))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_gpu_and_tpu_encoders_have_no_custom_vjp(platform):
    out, tangent = _jvp_through_encoder(platform)  # raises through any custom_vjp
    # the encoder is linear in no parameter, so the tangent is finite and not the output itself
    assert np.isfinite(tangent).all() and not np.allclose(tangent, out)


def test_cpu_encoder_takes_the_custom_vjps():
    # the check above can fail: on CPU the same trace meets the hand-written backward passes
    with pytest.raises(TypeError, match="custom_vjp"):
        _jvp_through_encoder("cpu")
