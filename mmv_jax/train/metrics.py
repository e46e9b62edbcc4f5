"""Metrics: ``metrics.jsonl`` + TensorBoard, compile counter, useful FLOPs and MFU."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from mmv_jax.batch import PATCH

# Dense bf16 peak FLOP/s per chip (vendor figures); CPUs are measured at start-up.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12,
}

_compiles = [0]


def _on_event(event: str, *args, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
    """XLA backend compiles in this process so far."""
    return _compiles[0]


def peak_flops_per_device(override: float = 0.0) -> float:
    """Config override, else the vendor table for the device kind, else a measured fp32 matmul."""
    if override > 0:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return measure_matmul_peak()


def measure_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 matmul FLOP/s of one device through XLA (the MFU denominator on CPU)."""
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def encoder_flops(width: int, depth: int, mlp_ratio: int, seg_lengths, modalities,
                  patch: int = PATCH) -> float:
    """Useful forward FLOPs of the encoder: patch embed (P^2 inputs for 2D tokens, P^3 for 3D),
    the dense layers, and block-diagonal attention only (sum of squared segment lengths)."""
    seg_lengths = np.asarray(seg_lengths, np.float64)
    tokens = seg_lengths.sum()
    embed_in = np.where(np.asarray(modalities) == 1, patch ** 3, patch ** 2)
    embed = 2.0 * width * float((seg_lengths * embed_in).sum())
    dense = 2.0 * tokens * (4 * width * width + 2 * mlp_ratio * width * width)
    attn = 4.0 * width * float((seg_lengths ** 2).sum())
    return embed + depth * (dense + attn)


def batch_flops(batch, width: int, depth: int, mlp_ratio: int) -> float:
    """Useful FLOPs of one training step (forward + backward = 3x forward) on a host batch."""
    seg = np.asarray(batch.segment_ids)
    mod = np.asarray(batch.view_modality)
    slots = mod.shape[1]
    lengths, modalities = [], []
    for r in range(seg.shape[0]):
        counts = np.bincount(seg[r], minlength=slots + 1)[1:]
        keep = counts > 0
        lengths.append(counts[keep])
        modalities.append(mod[r][keep])
    return 3.0 * encoder_flops(width, depth, mlp_ratio, np.concatenate(lengths),
                               np.concatenate(modalities))


class MetricWriter:
    """Appends JSON lines to ``workdir/metrics.jsonl`` and scalars to TensorBoard (process 0)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._path = os.path.join(workdir, "metrics.jsonl")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, values: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in values.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def truncate_after(self, step: int):
        """Drops lines past ``step`` (a resumed run rewrites them), keeping the file consistent."""
        if not self.enabled or not os.path.exists(self._path):
            return
        with open(self._path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self._path, "w") as f:
            f.writelines(rows)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _py(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
