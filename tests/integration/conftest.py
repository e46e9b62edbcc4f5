import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A small, fast variant of configs/demo.py: one block, 6 samples a step, one step shape.
FAST = [
    "--config.model.depth=1",
    "--config.model.proj_hidden=64",
    "--config.model.proj_dim=16",
    "--config.data.cxr_per_batch=4",
    "--config.data.ct_per_batch=2",
    "--config.data.buckets.rows_2d=(4,)",
    "--config.data.buckets.rows_3d=(4,)",
    "--config.loss.num_slices=32",
    "--config.optim.warmup_steps=2",
    "--config.async_checkpointing=False",
]


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mmv_jax.data.synthetic",
            "--out",
            str(out),
            "--n-cxr",
            "40",
            "--n-ct",
            "16",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return str(out / "manifest.jsonl")


def train_args(workdir, manifest, *extra, fast=FAST):
    """``launch.train``'s arguments for the demo config on ``manifest``, made small by ``fast``."""
    return [
        "launch.train",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.data.manifest={manifest}",
        *fast,
        *extra,
    ]


def train_cmd(workdir, manifest, *extra, fast=FAST):
    return [sys.executable, "-m", *train_args(workdir, manifest, *extra, fast=fast)]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
