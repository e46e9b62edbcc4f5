"""One ``jax.distributed`` set-up for a TPU pod slice, a SLURM GPU job and a single host.

- TPU VM slice: every worker runs the same command; ``jax.distributed.initialize()`` with no
  arguments discovers the slice from the TPU metadata.
- SLURM (one process per node or per GPU): JAX's SLURM cluster detection reads
  ``SLURM_JOB_ID`` / ``SLURM_NTASKS`` / ``SLURM_PROCID`` / the node list; with one task per GPU
  each process sees its GPU through ``SLURM_LOCALID``.
- Explicit: ``config.distributed.coordinator`` (``host:port``), ``num_processes``,
  ``process_id`` (or ``MMV_COORDINATOR`` / ``MMV_NUM_PROCESSES`` / ``MMV_PROCESS_ID``).
- Otherwise a single process: nothing to initialise.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _setting(cfg, key: str, env: str):
    value = cfg.get(key) if cfg is not None else None
    return value if value not in (None, "", -1) else os.environ.get(env)


def detect(cfg=None) -> str:
    """Which launch environment this process is in: ``explicit``, ``slurm``, ``tpu`` or ``single``."""
    if _setting(cfg, "coordinator", "MMV_COORDINATOR"):
        return "explicit"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID") or (
            os.environ.get("TPU_WORKER_ID") is not None and os.environ.get("TPU_ACCELERATOR_TYPE")):
        return "tpu"
    return "single"


def initialize(cfg=None) -> str:
    """Initialises ``jax.distributed`` once for the detected environment; returns its name."""
    kind = detect(cfg)
    if kind == "single" or getattr(initialize, "_done", False):
        return kind
    if kind == "explicit":
        jax.distributed.initialize(
            coordinator_address=_setting(cfg, "coordinator", "MMV_COORDINATOR"),
            num_processes=int(_setting(cfg, "num_processes", "MMV_NUM_PROCESSES")),
            process_id=int(_setting(cfg, "process_id", "MMV_PROCESS_ID")),
        )
    else:  # slurm / tpu: JAX's own cluster detection
        jax.distributed.initialize()
    initialize._done = True
    log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", kind,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return kind
