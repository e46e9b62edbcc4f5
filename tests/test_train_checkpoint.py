"""Checkpoint integrity: checksums that do not depend on sharding, and a damaged checkpoint
reported and skipped for the newest intact one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmv_jax.train import checkpoint


def _state(seed=0):
    k = jax.random.PRNGKey(seed)
    return {
        "w": jax.random.normal(k, (8, 16)),
        "b": jnp.zeros((16,), jnp.bfloat16),
        "step": jnp.int32(3),
        "rng": k,
    }


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def test_checksums_see_any_change_and_ignore_layout():
    s = _state()
    base = checkpoint.checksums(s)
    assert base == checkpoint.checksums(jax.tree.map(jnp.copy, s))
    w = np.asarray(s["w"]).copy()
    w.view(np.uint32)[2, 5] ^= 1  # one flipped bit
    assert checkpoint.checksums({**s, "w": jnp.asarray(w)})["['w']"] != base["['w']"]
    swapped = np.asarray(s["w"]).copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values in other places
    assert checkpoint.checksums({**s, "w": jnp.asarray(swapped)})["['w']"] != base["['w']"]


def test_a_corrupted_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"step": step, "bad_files": 0, "tried": 0})
    ckpt.wait()
    # silent corruption: the arrays still read, their values no longer match
    sums = tmp_path / "2" / "checksums" / "metadata"
    table = json.loads(sums.read_text())
    table["['w']"] ^= 1
    sums.write_text(json.dumps(table))
    step, state, data = ckpt.restore_latest_intact(_abstract(_state()))
    assert step == 1 and data["step"] == 1
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    assert "differ from their checksums" in caplog.text and str(tmp_path / "2") in caplog.text
    assert (tmp_path / "2.corrupt").is_dir() and ckpt.all_steps() == [1]
    # nothing intact at all: one clear error (damaged files in a fresh process:
    # tests/integration/test_nothing_lost.py)
    sums = tmp_path / "1" / "checksums" / "metadata"
    sums.write_text(json.dumps({k: v ^ 1 for k, v in json.loads(sums.read_text()).items()}))
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
        ckpt.restore_latest_intact(_abstract(_state()))
    ckpt.close()
