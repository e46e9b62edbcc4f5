"""Launch-environment detection and the platform guard (multi-process runs: tests/integration)."""
import numpy as np
import pytest

from mmv_jax.train import distributed


@pytest.mark.parametrize("env,kind", [
    ({}, "single"),
    ({"MMV_COORDINATOR": "host:1234"}, "explicit"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "single"),  # one task: nothing to join
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "tpu"),
])
def test_detect(monkeypatch, env, kind):
    for k in ("MMV_COORDINATOR", "SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "CLOUD_TPU_TASK_ID", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect() == kind


def test_platform_guard_fails_fast_naming_the_key():
    assert distributed.check_platform("") == "cpu" == distributed.check_platform("cpu")
    with pytest.raises(ValueError, match=r"config.require_platform='gpu'.*runs on 'cpu'"):
        distributed.check_platform("gpu")
    with pytest.raises(ValueError, match="config.require_platform"):
        distributed.check_platform("cuda")


def test_single_process_gather_is_the_identity():
    table = distributed.host_allgather(np.array([3, 4]))
    assert table.shape == (1, 2) and table.tolist() == [[3, 4]]
