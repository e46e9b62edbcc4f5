"""Launch-environment detection, the settings jax.distributed is initialised with (recorded, not
run), the platform guard, the device table and the single-process collectives (multi-process
runs: tests/integration)."""

import numpy as np
import pytest

from mmv_jax.train import distributed


@pytest.mark.parametrize(
    "env,kind",
    [
        ({}, "single"),
        ({"MMV_COORDINATOR": "host:1234"}, "explicit"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, "slurm"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "single"),  # one task: nothing to join
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, "tpu"),
        ({"CLOUD_TPU_TASK_ID": "0"}, "tpu"),
        ({"TPU_WORKER_ID": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-16"}, "tpu"),
        ({"TPU_WORKER_ID": "0"}, "single"),  # a worker id alone is not a slice
        ({"SLURM_NTASKS": "4"}, "single"),  # no job id: an inherited variable, not a SLURM task
        ({"MMV_COORDINATOR": "h:1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, "explicit"),
    ],
)
def test_detect(monkeypatch, env, kind):
    for k in (
        "MMV_COORDINATOR",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "TPU_WORKER_HOSTNAMES",
        "CLOUD_TPU_TASK_ID",
        "TPU_WORKER_ID",
        "TPU_ACCELERATOR_TYPE",
    ):
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


_ENV = (
    "MMV_COORDINATOR",
    "MMV_NUM_PROCESSES",
    "MMV_PROCESS_ID",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "TPU_WORKER_HOSTNAMES",
    "CLOUD_TPU_TASK_ID",
    "TPU_WORKER_ID",
    "TPU_ACCELERATOR_TYPE",
)


@pytest.fixture
def init_calls(monkeypatch):
    """A clean launch environment; ``jax.distributed.initialize`` records its arguments."""
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed.initialize, "_done", False, raising=False)
    return calls


def _dist_cfg(**overrides):
    import configs.base as base

    cfg = base.get_config().distributed
    cfg.update(overrides)
    return cfg


def test_explicit_settings_from_the_environment(init_calls, monkeypatch):
    monkeypatch.setenv("MMV_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("MMV_NUM_PROCESSES", "4")
    monkeypatch.setenv("MMV_PROCESS_ID", "3")
    cfg = _dist_cfg(heartbeat_timeout_s=7)
    assert distributed.initialize(cfg) == "explicit"
    assert init_calls == [
        dict(
            coordinator_address="10.0.0.1:1234",
            num_processes=4,
            process_id=3,
            initialization_timeout=300,
            heartbeat_timeout_seconds=7,
            shutdown_timeout_seconds=300,
        )
    ]
    assert distributed.initialize(cfg) == "explicit" and len(init_calls) == 1  # once per process


def test_config_settings_win_over_the_environment(init_calls, monkeypatch):
    monkeypatch.setenv("MMV_COORDINATOR", "env:1")
    monkeypatch.setenv("MMV_NUM_PROCESSES", "8")
    monkeypatch.setenv("MMV_PROCESS_ID", "5")
    # process 0 is a setting, not "unset" (unset is -1)
    distributed.initialize(_dist_cfg(coordinator="cfg:2", num_processes=2, process_id=0))
    call = init_calls[0]
    assert (call["coordinator_address"], call["num_processes"], call["process_id"]) == (
        "cfg:2",
        2,
        0,
    )


def test_cluster_and_single_initialisation(init_calls, monkeypatch):
    assert distributed.initialize(_dist_cfg()) == "single" and init_calls == []
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.initialize(None) == "slurm"
    assert init_calls == [{}]  # JAX's own SLURM detection, with its default timeouts


@pytest.mark.parametrize("backend", ["gpu", "cuda", "rocm"])
def test_gpu_backends_are_platform_gpu(monkeypatch, backend):
    monkeypatch.setattr(distributed.jax, "default_backend", lambda: backend)
    assert distributed.check_platform("gpu") == "gpu" == distributed.check_platform("")


class _Device:
    def __init__(self, process_index, kind):
        self.process_index, self.device_kind = process_index, kind


def test_devices_by_process(monkeypatch):
    assert distributed.devices_by_process() == [
        dict(
            process=0,
            count=len(distributed.jax.devices()),
            kind=distributed.jax.devices()[0].device_kind,
        )
    ]
    fake = [_Device(1, "TPU v4"), _Device(0, "TPU v4"), _Device(1, "TPU v4"), _Device(2, "TPU v4")]
    monkeypatch.setattr(distributed.jax, "devices", lambda *a: fake)
    assert [(e["process"], e["count"]) for e in distributed.devices_by_process()] == [
        (0, 1),
        (1, 2),
        (2, 1),
    ]


def test_kv_allgather_needs_jax_distributed():
    with pytest.raises(RuntimeError, match="jax.distributed"):
        distributed.KVAllgather()
