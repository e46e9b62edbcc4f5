"""The stage-3 train step compiles for TPU pod topologies from this CPU (needs libtpu)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu not installed (the test extra installs jax[tpu])",
)


# the 16-chip slice is marked slow (70 s on 2 cores); the default suite keeps the two-slice case
@pytest.mark.parametrize(
    "topology,slices,devices,hosts",
    [pytest.param("v5e:4x4", 1, 16, 4, marks=pytest.mark.slow), ("v5e:2x2", 2, 8, 2)],
)
def test_stage3_step_compiles_for_pod(topology, slices, devices, hosts):
    cmd = [
        sys.executable,
        "tools/aot_compile.py",
        "--config",
        "configs/stage3_joint.py",
        "--topology",
        topology,
        "--num-slices",
        str(slices),  # the docstring spelling
        # the real stage-3 step and batch shapes; one block keeps the compile short
        "--config.model.depth=1",
        "--config.data.buckets.max_shapes=1",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["devices"], out["hosts"]) == (devices, hosts)
    assert out["fits"] and 0 < out["bytes_per_device"] <= out["hbm_bytes"] == 16 << 30
    assert out["flops"] > 0 and len(out["compiled_shapes"]) >= 1
    for shape in out["compiled_shapes"]:
        assert shape["rows"] % out["devices"] == 0 and shape["seq_len"] % 128 == 0
