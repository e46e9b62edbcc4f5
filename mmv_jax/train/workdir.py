"""The run folder's records: ``config.json`` (the config the checkpoints were trained with),
``run_info.json`` (one entry per start: topology, versions, commit, command line) and
``lock.json`` (one trainer per run folder).

A resume whose config changes the math of the run (model, loss, optimizer, seed, global batch)
is refused, naming the keys, unless ``config.allow_config_change=True``; the schedule of logs and
checkpoints, ``total_steps``, the mesh, the data loading and the distributed set-up may change.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
import time

import jax
import ml_collections

from mmv_jax import paths
from mmv_jax.errors import ConfigError
from mmv_jax.train import distributed

log = logging.getLogger(__name__)

# Config prefixes whose change alters what is trained; everything else may change on a resume.
# these change how, not what, the model computes (model.remat: the key before remat_policy)
# data.buckets is layout, not math: any packing gives the same loss (the topology tests show it)
MATH_KEYS = (
    "seed",
    "model.",
    "loss.",
    "optim.",
    "data.cxr_per_batch",
    "data.ct_per_batch",
    "data.shuffle_seed",
    "data.views.",
    "data.ct_window",
)
FREE_KEYS = ("model.remat", "model.remat_policy", "model.scan_layers", "model.attention_impl")
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def math_changes(old: dict, new: dict) -> list[str]:
    """Keys (dotted) whose values differ between two configs (as JSON dicts) and change the math."""
    a, b = _flat(old), _flat(new)
    changed = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and key.startswith(MATH_KEYS) and key not in FREE_KEYS:
            changed.append(key)
    return changed


def _as_json(cfg) -> dict:
    return json.loads(
        cfg.to_json() if isinstance(cfg, ml_collections.ConfigDict) else json.dumps(cfg)
    )


def check_and_record_config(cfg, workdir, *, resuming: bool) -> None:
    """On a resume, compares ``cfg`` with the run's ``config.json`` (raises on a change of the
    math unless ``cfg.allow_config_change``); process 0 then writes ``config.json``."""
    path = paths.resolve(workdir) / "config.json"
    new = _as_json(cfg)
    if resuming and path.exists():
        old = json.loads(path.read_text())
        changed = math_changes(old, new)
        if changed and not cfg.get("allow_config_change", False):
            listing = ", ".join(
                f"{k}: {_flat(old).get(k)!r} -> {_flat(new).get(k)!r}" for k in changed
            )
            raise ConfigError(
                f"config: resuming {workdir} with a config that changes the math of the run "
                f"({listing}); rerun with the original values, use a new --workdir, or pass "
                f"--config.allow_config_change=True"
            )
        if changed:
            log.warning(
                "resuming with changed config (allow_config_change): %s", ", ".join(changed)
            )
    if jax.process_index() == 0:
        paths.write_text_atomic(path, json.dumps(new, indent=1))


def _git_commit() -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    dirty = subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info(start_step: int, platform: str) -> dict:
    return dict(
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        start_step=int(start_step),
        platform=platform,
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        devices=distributed.devices_by_process(),
        versions={n: _version(n) for n in VERSIONED},
        python=sys.version.split()[0],
        git_commit=_git_commit(),
        argv=list(sys.argv),
    )


def record_start(workdir, start_step: int, platform: str) -> dict:
    """Appends this start to ``run_info.json`` (``{"starts": [...]}``; process 0 writes)."""
    info = run_info(start_step, platform)
    if jax.process_index() == 0:
        path = paths.resolve(workdir) / "run_info.json"
        starts = json.loads(path.read_text())["starts"] if path.exists() else []
        paths.write_text_atomic(path, json.dumps({"starts": starts + [info]}, indent=1))
    return info


class WorkdirBusy(RuntimeError):
    """Another live trainer holds the run folder."""


class Lock:
    """``workdir/lock.json`` (host, pid, start time, last refresh, SLURM job id), held by process 0
    for the whole run so that two trainers never write one run folder. A lock whose holder is
    gone is taken over with a message: same host and the pid is dead, the same SLURM job
    (requeued), or (another host) not refreshed for ``stale_s`` seconds; the loop refreshes it at
    every logged step."""

    def __init__(self, workdir, *, stale_s: float = 600.0):
        self.path = paths.resolve(workdir) / "lock.json"
        self.stale_s = float(stale_s)
        self.held = False

    def _mine(self) -> dict:
        return dict(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=self._started,
            refreshed=time.time(),
            slurm_job=os.environ.get("SLURM_JOB_ID"),
        )

    def _stale(self, other: dict) -> str | None:
        if other.get("host") == socket.gethostname():
            try:
                os.kill(int(other["pid"]), 0)
            except ProcessLookupError:
                return "its process is gone"
            except PermissionError:
                return None
            return None
        if other.get("slurm_job") and other["slurm_job"] == os.environ.get("SLURM_JOB_ID"):
            return "it belongs to this SLURM job (requeued)"
        age = time.time() - float(other.get("refreshed", 0))
        return f"it was last refreshed {age:.0f} s ago" if age > self.stale_s else None

    def acquire(self) -> None:
        if jax.process_index() != 0:
            return
        self._started = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self._mine())
        if not paths.is_uri(self.path):
            try:  # atomic create: of two trainers starting at once, one wins
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                self.held = True
                return
            except FileExistsError:
                pass
        if self.path.exists():
            try:
                other = json.loads(self.path.read_text())
            except (ValueError, OSError):
                other = {}
            why = self._stale(other) if other else "it is unreadable"
            if why is None:
                raise WorkdirBusy(
                    f"{self.path.parent} is in use by another trainer (host {other.get('host')}, "
                    f"pid {other.get('pid')}, started {time.ctime(float(other.get('started', 0)))}); "
                    f"use another --workdir, or stop that trainer first"
                )
            log.warning("taking over the stale lock %s (%s)", self.path, why)
        paths.write_text_atomic(self.path, text)
        self.held = True

    def refresh(self) -> None:
        if self.held:
            paths.write_text_atomic(self.path, json.dumps(self._mine()))

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (ValueError, OSError):
                pass
            self.held = False
