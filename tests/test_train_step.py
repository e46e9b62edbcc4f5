import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import synthetic_batch, tiny_config

from mmv_jax.train import sharding as shd, state as st
from mmv_jax.train.step import setup


def _setup(cfg):
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    step, state, _, _ = setup(cfg, mesh, num_samples=4, num_views=4)
    return state, step


def test_step_updates_and_skips_nonfinite():
    cfg = tiny_config(**{"model.depth": 1})  # (the blocks change nothing here: one compiles fast)
    cfg.model.update(dict(proj_layers=2))
    state, step = _setup(cfg)
    batch = jax.tree.map(jnp.asarray, synthetic_batch())
    before = jax.tree.map(np.asarray, state.params)
    state, m = step(state, batch)  # lr(0) = 0 (warm-up from zero): params unchanged
    state, m = step(state, batch)
    assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
    assert float(m["loss"]) == pytest.approx(
        (1 - 0.025) * float(m["pred_loss"]) + 0.025 * float(m["sigreg_loss"]), rel=1e-5
    )
    changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), before, state.params)
    assert any(jax.tree.leaves(changed))
    assert int(state.step) == 2

    after_good = jax.tree.map(np.asarray, state.params)
    bad = batch._replace(patches=batch.patches.at[0, 0, 0].set(jnp.nan))
    state, m = step(state, bad)
    assert not bool(m["finite"]) and int(state.nonfinite) == 1 and int(state.step) == 3
    for a, b in zip(jax.tree.leaves(after_good), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, m = step(state, batch)
    assert int(state.nonfinite) == 0


def test_compiles_once_per_bucket_shape():
    cfg = tiny_config(**{"model.depth": 1})
    state, step = _setup(cfg)
    shapes = [(2, 128), (2, 128), (4, 128), (2, 128), (4, 128)]
    for i, (rows, seq) in enumerate(shapes):
        batch = jax.tree.map(jnp.asarray, synthetic_batch(rows=rows, seq_len=seq, seed=i))
        state, _ = step(state, batch)
        assert step.compiles == (1 if i < 2 else 2)
    for i in range(3):
        state, _ = step(state, jax.tree.map(jnp.asarray, synthetic_batch(rows=4, seed=10 + i)))
    assert step.compiles == 2


def test_weight_decay_mask_and_schedule():
    """Decay by name: the model's weights decay; biases (qkv_bias is [3, H, Dh]) and norms don't.
    Seen through the optimizer itself: all parameters at one, zero gradients, three updates
    (step 0 has lr 0): what moved is what decays."""
    from flax import nnx

    cfg = tiny_config(**{"model.depth": 1})
    _, abstract = nnx.split(nnx.eval_shape(lambda: st.build_model(cfg)), nnx.Param)
    tx = st.make_optimizer(cfg)

    @jax.jit
    def three_updates(params):
        opt, new = tx.init(params), params
        for _ in range(3):
            upd, opt = tx.update(jax.tree.map(jnp.zeros_like, new), opt, new)
            new = optax.apply_updates(new, upd)
        return new

    new = three_updates(jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), abstract))
    key = lambda k: str(getattr(k, "key", getattr(k, "name", k)))
    moved = {
        "/".join(key(k) for k in path if key(k) != "value"): bool((np.asarray(x) != 1).any())
        for path, x in jax.tree_util.tree_flatten_with_path(new)[0]
    }
    leaf = lambda name: name.split("/")[-1]
    assert {leaf(n) for n, m in moved.items() if m} == {"kernel", "qkv", "proj"}
    assert {leaf(n) for n, m in moved.items() if not m} == {
        "bias",
        "scale",
        "qkv_bias",
        "proj_bias",
    }
    assert not any("norm" in n and m for n, m in moved.items())
    assert float(st.learning_rate(cfg, 0)) == 0.0
    assert float(st.learning_rate(cfg, 2)) == pytest.approx(cfg.optim.lr)
    assert float(st.learning_rate(cfg, cfg.total_steps)) == pytest.approx(0.0, abs=1e-12)


def test_bad_mesh_names_the_key():
    with pytest.raises(ValueError, match="config.mesh.shape"):
        shd.mesh_shape((3, 1, 1), 8)
    with pytest.raises(ValueError, match="config.mesh.shape"):
        shd.mesh_shape((-1, -1, 1), 8)
    assert shd.mesh_shape((2, -1, 2), 8) == (2, 2, 2)


def test_remat_cuts_compiled_memory_on_cpu():
    from mmv_jax.train.step import compiler_options

    """XLA:CPU strips jax.checkpoint's CSE barriers unless told not to (train.step.compiler_options):
    without that the recomputation merges back into the forward and remat saves nothing."""
    batch = jax.tree.map(jnp.asarray, synthetic_batch(rows=2, seq_len=512))
    temp = {}
    for remat in (False, True):
        cfg = tiny_config(
            **{"model.remat_policy": "nothing_saveable" if remat else "none", "model.depth": 4}
        )
        state, step = _setup(cfg)
        temp[remat] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.75 * temp[False], temp
    # the XLA:CPU pass name never reaches the GPU or TPU compilers
    assert compiler_options(cfg, "cpu") and compiler_options(cfg, "tpu") is None
    assert compiler_options(cfg, "gpu") is None


def _views(seed=0):
    from mmv_jax.data.patches import make_view

    rng = np.random.default_rng(seed)
    views = []
    for s in range(4):
        for i in range(4):
            g = 2 if i < 2 else 1
            shape = (14 * g, 14 * g, 14) if s % 2 else (1, 14 * (g + 1), 14 * g)
            views.append(
                make_view(
                    rng.uniform(-1, 1, shape).astype(np.float32), sample=s, is_global=i < 2, index=i
                )
            )
    return views


def test_row_groups_give_the_same_loss_and_gradients_as_one_batch():
    """The wire format (2D rows P*P wide and 3D rows P**3 wide, in two groups) changes nothing:
    the same views packed the old way (one batch, every token P**3 wide) give the same loss
    and gradients in fp32."""
    from flax import nnx

    from mmv_jax.data import packing
    from mmv_jax.train.step import loss_fn

    cfg = tiny_config(**{"model.depth": 2})
    views = _views()
    one = packing.pack_into(views, 4, 128, 12, 14**3)
    grouped, need = packing.pack_groups(views, ("2d", "3d"), 128, 12)
    assert [g.patches.shape[-1] for g in grouped] == [14 * 14, 14**3] and need.tolist() == [1, 1]
    grouped = tuple(packing.pad_rows(g, r) for g, r in zip(grouped, (2, 3)))  # with padding rows
    graphdef, params = nnx.split(st.build_model(cfg), nnx.Param)
    f = jax.jit(
        jax.value_and_grad(
            lambda p, b: loss_fn(
                p,
                graphdef,
                b,
                jax.random.PRNGKey(1),
                num_samples=4,
                num_views=4,
                lam=0.1,
                num_slices=32,
            )[0]
        )
    )
    l1, g1 = f(params, jax.tree.map(jnp.asarray, one))
    l2, g2 = f(params, jax.tree.map(jnp.asarray, grouped))
    assert float(l1) == pytest.approx(float(l2), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_wire_dtypes():
    """bfloat16 patches change nothing for a bf16 model (it casts them first); uint8 patches
    are the [-1, 1] values in 255 levels, mapped back on the device."""
    from flax import nnx

    from mmv_jax.batch import to_wire, wire_dtype
    from mmv_jax.model.encoder import Encoder, encoder_config

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 128, 14**3)).astype(np.float32)
    q = to_wire(x, wire_dtype("uint8"))
    assert q.dtype == np.uint8 and np.abs(q / 127.5 - 1 - x).max() <= 1 / 255 + 1e-6  # half a level
    for dtype, wire in (("bfloat16", "bfloat16"), ("float32", "uint8")):
        enc = Encoder(
            encoder_config("Ti/14", depth=1, dtype=dtype, max_segment_len=None), rngs=nnx.Rngs(0)
        )
        w = to_wire(x, wire_dtype(wire))
        ref = x if wire == "bfloat16" else (w.astype(np.float32) / 127.5 - 1)
        a = np.asarray(enc.embed_patches(jnp.asarray(w)), np.float32)
        b = np.asarray(enc.embed_patches(jnp.asarray(ref)), np.float32)
        assert w.nbytes == x.nbytes // (2 if wire == "bfloat16" else 4)
        # bf16: bit-identical; uint8: the device's division vs numpy's, to the last bit or so
        np.testing.assert_allclose(a, b, rtol=0, atol=0 if wire == "bfloat16" else 1e-5)
