"""Sharded train steps on 8 CPU devices equal the single-device step."""

import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from helpers import synthetic_batch, tiny_config
from mmv_jax.train import sharding as shd
from mmv_jax.train.step import setup

cfg = tiny_config(**{"model.variant": "S/14", "model.depth": 1})
batches = [synthetic_batch(num_samples=8, rows=8, seq_len=128, slots=8, seed=s) for s in range(2)]
out = {}
for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    n = int(np.prod(shape))
    mesh = shd.make_mesh(shape, jax.devices()[:n])
    step, state, state_sh, b_sh = setup(cfg, mesh, num_samples=8, num_views=4)
    losses = []
    for b in batches:
        state, m = step(state, shd.global_batch(b, b_sh))
        losses.append(float(m["loss"]))
    leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]
    specs = sorted({str(s.spec) for s in jax.tree.leaves(state_sh.params)})
    out[str(shape)] = {"losses": losses, "params": np.concatenate(leaves).tolist()[:200000],
                       "specs": specs}
print("RESULT" + json.dumps(out))
"""


def test_meshes_match_single_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    res = json.loads(line[len("RESULT") :])
    ref = res["(1, 1, 1)"]
    for shape in ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)"]:
        np.testing.assert_allclose(res[shape]["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(res[shape]["params"], ref["params"], rtol=1e-5, atol=1e-6)
    # the fsdp/tensor meshes really shard parameters
    assert any("fsdp" in s for s in res["(2, 4, 1)"]["specs"])
    assert any("tensor" in s for s in res["(2, 2, 2)"]["specs"])
