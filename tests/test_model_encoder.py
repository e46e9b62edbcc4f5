import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmv_jax.data.packing import pack_into as pack_views, pack_rows
from mmv_jax.data.patches import make_view
from mmv_jax.errors import ConfigError
from mmv_jax.model.encoder import Encoder, encoder_config, param_count
from mmv_jax.model.heads import MultiMedVision


def small_encoder(**kw):
    cfg = encoder_config("Ti/14", **{"depth": 2, **kw})
    return Encoder(cfg, rngs=nnx.Rngs(0))


def mixed_views(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(1, 56, 42), (1, 28, 70), (28, 28, 42), (1, 14, 14), (42, 14, 28), (1, 42, 28)]
    return [
        make_view(rng.uniform(-1, 1, s).astype(np.float32), sample=i, is_global=i % 2 == 0, index=0)
        for i, s in enumerate(shapes)
    ]


def embed_one(model, view, seq_len=128, slots=4, offset_views=()):
    batch = pack_rows([list(offset_views) + [view]], seq_len, slots)
    out = model(jax.tree.map(jnp.asarray, batch))
    return np.asarray(out[0, len(offset_views)])


@pytest.mark.parametrize("max_segment_len", [None, 36])
def test_view_embedding_is_independent_of_packing(max_segment_len):
    model = small_encoder(max_segment_len=max_segment_len)
    views = mixed_views()
    alone = [embed_one(model, v) for v in views]
    for perm_seed in range(3):
        order = np.random.default_rng(perm_seed).permutation(len(views))
        batch = pack_rows(
            [[views[i] for i in order[:4]], [views[i] for i in order[4:]]], seq_len=128, slots=6
        )
        out = np.asarray(model(jax.tree.map(jnp.asarray, batch)))
        for r in range(2):
            for j, s in enumerate(batch.view_sample[r]):
                if s >= 0:
                    np.testing.assert_allclose(out[r, j], alone[s], atol=1e-5)
    # a different position inside the row (after a 3D view) gives the same result
    np.testing.assert_allclose(
        embed_one(model, views[0], offset_views=[views[2]]), alone[0], atol=1e-5
    )


def test_2d_shortcut_equals_zero_padded_pseudo_volume():
    model = small_encoder()
    rng = np.random.default_rng(3)
    imgs = [
        rng.uniform(-1, 1, (1, 42, 56)).astype(np.float32),
        rng.uniform(-1, 1, (1, 28, 28)).astype(np.float32),
    ]
    full = pack_views(
        [make_view(im, sample=i, is_global=True, index=0) for i, im in enumerate(imgs)], 1, 64, 2
    )
    short = pack_views(
        [
            make_view(im, sample=i, is_global=True, index=0, depth_slice_only=True)
            for i, im in enumerate(imgs)
        ],
        1,
        64,
        2,
    )
    assert full.patches.shape[-1] == 14**3 and short.patches.shape[-1] == 14**2
    a = model.embed_patches(jnp.asarray(full.patches))
    b = model.embed_patches(jnp.asarray(short.patches))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(
        model(jax.tree.map(jnp.asarray, full)), model(jax.tree.map(jnp.asarray, short)), atol=1e-5
    )
    with pytest.raises(ValueError, match="P\\^3"):
        model.embed_patches(jnp.zeros((1, 4, 100)))


def test_parameter_counts():
    # standard ViT blocks (12 * (12 d^2 + 13 d)) + final norm (2 d) + P^3 patch embedding (2744 d + d);
    # no class token, no learned position table (3D RoPE).
    want = {"Ti/14": 5_865_792, "S/14": 22_348_416, "B/14": 87_164_160}
    for variant, n in want.items():
        cfg = encoder_config(variant)
        d = cfg.width
        assert n == 12 * (12 * d * d + 13 * d) + 2 * d + 14**3 * d + d
        abstract = nnx.eval_shape(lambda cfg=cfg: Encoder(cfg, rngs=nnx.Rngs(0)))
        assert param_count(abstract) == n
    with pytest.raises(ValueError, match="model.variant"):
        encoder_config("H/14")


@pytest.mark.parametrize(
    "remat_policy,scan_layers",
    [("nothing_saveable", False), ("dots_saveable", True), ("none", True)],
)
def test_remat_and_scan_give_the_same_values_and_grads(remat_policy, scan_layers):
    views = mixed_views(1)
    batch = jax.tree.map(jnp.asarray, pack_views(views, 2, 128, 6))
    plain = small_encoder(depth=3)
    other = small_encoder(depth=3, remat_policy=remat_policy, scan_layers=scan_layers)

    def loss(m):
        return jnp.sum(m(batch) ** 2)

    np.testing.assert_allclose(plain(batch), other(batch), atol=1e-6)
    g1 = nnx.grad(loss)(plain)
    g2 = nnx.grad(loss)(other)
    # the parameter tree is the same with and without the scan (checkpoints do not see it)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def test_unknown_remat_policy_names_the_key():
    with pytest.raises(ConfigError, match="config.model.remat_policy"):
        encoder_config("Ti/14", remat_policy="everything")


def test_full_model_shapes_and_logical_axes():
    cfg = encoder_config("Ti/14", depth=1)
    model = MultiMedVision(cfg, proj_hidden=64, proj_dim=16, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, pack_views(mixed_views(), 2, 128, 6))
    emb, proj = model(batch)
    assert emb.shape == (2, 6, 192) and proj.shape == (2, 6, 16)
    state = nnx.state(model, nnx.Param)
    for path, var in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]:
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, path
