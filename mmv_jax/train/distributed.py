"""One ``jax.distributed`` set-up for a TPU pod slice, a SLURM GPU job and a single host.

- TPU VM slice: every worker runs the same command; ``jax.distributed.initialize()`` with no
  arguments discovers the slice from the TPU metadata.
- SLURM (one process per node or per GPU): JAX's SLURM cluster detection reads
  ``SLURM_JOB_ID`` / ``SLURM_NTASKS`` / ``SLURM_PROCID`` / the node list; with one task per GPU
  each process sees its GPU through ``SLURM_LOCALID``.
- Explicit: ``config.distributed.coordinator`` (``host:port``), ``num_processes``,
  ``process_id`` (or ``MMV_COORDINATOR`` / ``MMV_NUM_PROCESSES`` / ``MMV_PROCESS_ID``).
- Otherwise a single process: nothing to initialise.

A dead host: every process sends heartbeats to the coordination service; one that misses them
for ``distributed.heartbeat_timeout_s`` is declared dead and JAX terminates the others with an
error naming the failed task, instead of leaving them blocked in a collective forever.
``distributed.shutdown_timeout_s`` bounds how long a finished process waits for the others at
exit; ``distributed.initialization_timeout_s`` how long processes wait for each other at start.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from mmv_jax.errors import ConfigError

log = logging.getLogger(__name__)

PLATFORMS = ("", "cpu", "gpu", "tpu")


def _setting(cfg, key: str, env: str):
    value = cfg.get(key) if cfg is not None else None
    return value if value not in (None, "", -1) else os.environ.get(env)


def detect(cfg=None) -> str:
    """Which launch environment this process is in: ``explicit``, ``slurm``, ``tpu`` or ``single``."""
    if _setting(cfg, "coordinator", "MMV_COORDINATOR"):
        return "explicit"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    if (
        os.environ.get("TPU_WORKER_HOSTNAMES")
        or os.environ.get("CLOUD_TPU_TASK_ID")
        or (os.environ.get("TPU_WORKER_ID") is not None and os.environ.get("TPU_ACCELERATOR_TYPE"))
    ):
        return "tpu"
    return "single"


def initialize(cfg=None) -> str:
    """Initialises ``jax.distributed`` once for the detected environment; returns its name."""
    kind = detect(cfg)
    if kind == "single" or getattr(initialize, "_done", False):
        return kind
    timeouts = {}
    if cfg is not None:
        timeouts = dict(
            initialization_timeout=int(cfg.get("initialization_timeout_s", 300)),
            heartbeat_timeout_seconds=int(cfg.get("heartbeat_timeout_s", 100)),
            shutdown_timeout_seconds=int(cfg.get("shutdown_timeout_s", 300)),
        )
    if kind == "explicit":
        jax.distributed.initialize(
            coordinator_address=_setting(cfg, "coordinator", "MMV_COORDINATOR"),
            num_processes=int(_setting(cfg, "num_processes", "MMV_NUM_PROCESSES")),
            process_id=int(_setting(cfg, "process_id", "MMV_PROCESS_ID")),
            **timeouts,
        )
    else:  # slurm / tpu: JAX's own cluster detection
        jax.distributed.initialize(**timeouts)
    initialize._done = True
    log.info(
        "jax.distributed (%s): process %d of %d, %d local / %d global devices",
        kind,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return kind


def check_platform(expected: str) -> str:
    """The platform JAX runs on (``cpu``/``gpu``/``tpu``); raises when ``expected`` (a config
    value, ``""`` = any) is not it, e.g. a GPU job whose CUDA plugin failed to load."""
    if expected not in PLATFORMS:
        raise ConfigError(f"config.require_platform={expected!r} must be one of {PLATFORMS}")
    backend = jax.default_backend()
    platform = "gpu" if backend in ("gpu", "cuda", "rocm") else backend
    if expected and platform != expected:
        raise ConfigError(
            f"config.require_platform={expected!r} but JAX runs on {platform!r} "
            f"({jax.devices()[0].device_kind}); install the '{expected}' extra "
            f"(pip install -e '.[{expected}]') and check that the accelerator is visible"
        )
    return platform


def devices_by_process() -> list[dict]:
    """``[{"process", "count", "kind"}, ...]``: every process's devices (from the global list)."""
    out: dict[int, dict] = {}
    for d in jax.devices():
        entry = out.setdefault(
            d.process_index, dict(process=d.process_index, count=0, kind=d.device_kind)
        )
        entry["count"] += 1
    return [out[p] for p in sorted(out)]


def host_allgather(local: np.ndarray) -> np.ndarray:
    """``[k]`` integers on each process -> ``[P, k]`` on every process, through the devices (one
    small collective; values must fit in int32). It waits for the work already queued on the
    devices: for set-up, not for the per-step path (:class:`KVAllgather`)."""
    local = np.asarray(local, np.int32)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


class KVAllgather:
    """``[k]`` integers on each process -> ``[P, k]`` on every process, through the coordination
    service's key-value store: host to host, no device work, so it neither waits for the step
    running on the devices nor needs ordering against the step's collectives. The per-step
    bucket agreement of the train iterator.

    Every process must call it the same number of times (round ``n`` uses keys ``<prefix>/n/p``).
    After round ``n`` every process has entered it, so all have read round ``n - 1``: each
    process then deletes its own key of that round, keeping the store small."""

    def __init__(self, prefix: str = "mmv_jax/agree", timeout_s: float = 3600.0):
        from jax._src import distributed as jax_distributed  # the client of jax.distributed

        self._client = jax_distributed.global_state.client
        if self._client is None:
            raise RuntimeError("KVAllgather needs jax.distributed to be initialised")
        self._prefix, self._timeout_ms = prefix, int(timeout_s * 1000)
        self._round = 0
        self._proc, self._nproc = jax.process_index(), jax.process_count()

    def __call__(self, local) -> np.ndarray:
        n, c = self._round, self._client
        c.key_value_set(
            f"{self._prefix}/{n}/{self._proc}",
            ",".join(str(int(v)) for v in np.asarray(local).ravel()),
        )
        rows = [
            c.blocking_key_value_get(f"{self._prefix}/{n}/{p}", self._timeout_ms)
            for p in range(self._nproc)
        ]
        if n:
            c.key_value_delete(f"{self._prefix}/{n - 1}/{self._proc}")
        self._round += 1
        return np.array([[int(v) for v in r.split(",")] for r in rows], np.int64)


def preemption_requested(step: int) -> bool:
    """True on every process at the same step once any of them got SIGTERM (JAX's preemption
    sync point: call it at every step, on every process)."""
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)
