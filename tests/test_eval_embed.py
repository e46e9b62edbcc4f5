"""mmv-embed: a 2D-only (stage-1-like) run embeds CT, with the attention bound sized from the
data being embedded, and the run's own (too short) bound still gives the same, finite values."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import tiny_config

from mmv_jax.data import pipeline, synthetic
from mmv_jax.data.manifest import load_manifest
from mmv_jax.eval import embed
from mmv_jax.train import sharding as shd, state as st


def _stage1_like():
    cfg = tiny_config(**{"model.depth": 2, "model.max_segment_len": -1})
    cfg.data = pipeline.demo_config()
    cfg.data.cxr_per_batch, cfg.data.ct_per_batch = 4, 0  # X-rays only, as stage 1
    return cfg


def test_stage1_run_embeds_ct_finite(tmp_path):
    cfg = _stage1_like()
    t2, t3 = pipeline.max_view_tokens(cfg.data)
    assert st.encoder_config_from(cfg).max_segment_len == t2 < t3  # the run's own bound
    records = load_manifest(synthetic.make_demo_dataset(str(tmp_path / "d"), n_cxr=1, n_ct=2))
    mesh = shd.make_mesh((-1, 1, 1))

    enc = embed.build_encoder(
        cfg, None, mesh, random_init=True, modalities={r.modality for r in records}
    )
    assert enc.cfg.max_segment_len == t3
    assert (
        embed.build_encoder(
            cfg, None, mesh, random_init=True, modalities={"cxr"}
        ).cfg.max_segment_len
        == t2
    )
    data = embed.embed(cfg, records, enc, str(tmp_path / "emb.npz"), mesh, progress=False)
    z = data["embeddings"]
    assert z.shape[0] == 3 and np.isfinite(z).all()
    ct = data["modality"] == "ct"
    assert ct.sum() == 2 and np.abs(z[ct]).max() > 0

    # the run's own bound (a whole X-ray) on a whole CT: the attention falls back to the
    # unbounded computation, so the embedding equals the dense-attention one
    batch, ids = next(
        pipeline.make_eval_iterator(
            cfg.data, [r for r in records if r.modality == "ct"], batch_size=2
        )
    )
    batch = jax.tree.map(jnp.asarray, batch)
    longest = max(np.bincount(r)[1:].max() for r in np.asarray(batch.segment_ids) if r.any())
    assert longest > t2
    own = st.build_model(cfg, seed=cfg.seed).encoder
    dense_cfg = cfg.copy_and_resolve_references()
    dense_cfg.model.max_segment_len = 0
    dense = st.build_model(dense_cfg, seed=cfg.seed).encoder
    a, b = np.asarray(own(batch)), np.asarray(dense(batch))
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-4)
