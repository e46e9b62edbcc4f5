"""The dispatcher: platform resolution (from the mesh, not the host's backend) and its checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.kernels.attention import resolve_impl, resolve_platform, segment_attention
from mmv_jax.kernels.reference import segment_attention_reference


@pytest.fixture
def tpu_host(monkeypatch):
    """A host whose default backend claims TPU: what the mesh says must win over it."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")


def test_auto_picks_by_the_platform():
    assert resolve_impl("auto", platform="tpu") == "pallas_tpu"
    assert resolve_impl("auto", platform="gpu") == "triton_gpu"
    assert resolve_impl("auto", platform="cuda") == "triton_gpu"
    assert resolve_impl("auto", platform="cpu") == "xla"
    assert resolve_impl("auto", platform="rocm") == "xla"
    assert resolve_impl("auto") == "xla"  # tests run on CPU
    assert resolve_impl("triton_gpu", platform="tpu") == "triton_gpu"  # an explicit impl wins
    with pytest.raises(ValueError, match="platform"):
        resolve_impl("auto", platform="TPU")
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cudnn")


def test_platform_comes_from_the_mesh_before_the_backend(tpu_host):
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices("cpu")[:1])
    assert resolve_platform() == "tpu"  # no mesh anywhere: the default backend
    assert resolve_impl("auto") == "pallas_tpu"
    assert resolve_platform(mesh) == "cpu"
    assert resolve_platform(mesh.abstract_mesh) == "cpu"
    with jax.set_mesh(mesh):  # the mesh in context, also while tracing
        assert resolve_impl("auto") == "xla"
        seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0, 0]], jnp.int32)
        x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 1, 8))
        out = jax.jit(lambda x: segment_attention(x, x, x, seg))(x)  # would fail as pallas_tpu
    np.testing.assert_allclose(out, segment_attention_reference(x, x, x, seg), atol=1e-6)


def test_bad_requests_raise():
    q = jnp.zeros((1, 8, 1, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        segment_attention(q, q, q, jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="interpret"):
        segment_attention(q, q, q, jnp.zeros((1, 8), jnp.int32), impl="xla", interpret=True)


def test_encoder_follows_the_mesh_it_is_traced_for(tpu_host):
    """The encoder resolves "auto" from the mesh of its axis rules, not the host's backend (the
    AOT tool compiles for a TPU topology on a CPU this way)."""
    from flax import nnx
    from helpers import synthetic_batch

    from mmv_jax.model.axes import axis_rules
    from mmv_jax.model.encoder import Encoder, encoder_config
    from mmv_jax.train.sharding import DEFAULT_RULES, make_mesh, rules_dict

    mesh = make_mesh((1, 1, 1), jax.devices("cpu")[:1])
    enc = Encoder(encoder_config("Ti/14", depth=1, max_segment_len=None), rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch())
    with axis_rules(mesh, rules_dict(DEFAULT_RULES)):
        out = jax.jit(lambda b: enc(b))(batch)  # as pallas_tpu this would not run on the CPU
    assert np.isfinite(np.asarray(out)).all()
