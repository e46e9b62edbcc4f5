"""Metrics: ``metrics.jsonl`` + TensorBoard, useful FLOPs and MFU. (The step counts its own
compiles: ``Step.compiles`` in :mod:`mmv_jax.train.step`.)"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np

from mmv_jax import paths
from mmv_jax.batch import PATCH, groups

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip (vendor figures); CPUs are measured at start-up.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
}


def peak_flops(override: float = 0.0, dtype: str = "bfloat16") -> float:
    """The MFU denominator for all devices together, FLOP/s: ``override`` per device (config),
    else the vendor's dense bf16 figure per accelerator (``dtype`` float32 on an accelerator
    is still scored against it: what the hardware could do), else on CPU one measured matmul
    in ``dtype`` per process: host "devices" forced with
    ``--xla_force_host_platform_device_count`` share the same cores, so they are not summed."""
    devices = jax.devices()
    if override > 0:
        return float(override) * len(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_peak(dtype=dtype) * jax.process_count()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    log.warning(
        "no peak FLOP/s known for %r; MFU is reported against 1 PFLOP/s per device "
        "(set config.peak_flops_per_device)",
        kind,
    )
    return 1e15 * len(devices)


def measure_matmul_peak(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Best ``dtype`` matmul FLOP/s of one device through XLA (the MFU denominator on CPU)."""
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def encoder_flops(
    width: int, depth: int, mlp_ratio: int, seg_lengths, modalities, patch: int = PATCH
) -> float:
    """Useful forward FLOPs of the encoder: patch embed (P^2 inputs for 2D tokens, P^3 for 3D),
    the dense layers, and block-diagonal attention only (sum of squared segment lengths)."""
    seg_lengths = np.asarray(seg_lengths, np.float64)
    tokens = seg_lengths.sum()
    embed_in = np.where(np.asarray(modalities) == 1, patch**3, patch**2)
    embed = 2.0 * width * float((seg_lengths * embed_in).sum())
    dense = 2.0 * tokens * (4 * width * width + 2 * mlp_ratio * width * width)
    attn = 4.0 * width * float((seg_lengths**2).sum())
    return embed + depth * (dense + attn)


def batch_flops(batch, width: int, depth: int, mlp_ratio: int) -> float:
    """Useful FLOPs of one training step (forward + backward = 3x forward) on a host batch (one
    PackedBatch or a train batch's row groups)."""
    lengths, modalities = [], []
    for group in groups(batch):
        seg = np.asarray(group.segment_ids)
        mod = np.asarray(group.view_modality)
        slots = mod.shape[1]
        for r in range(seg.shape[0]):
            counts = np.bincount(seg[r], minlength=slots + 1)[1:]
            keep = counts > 0
            lengths.append(counts[keep])
            modalities.append(mod[r][keep])
    return 3.0 * encoder_flops(
        width, depth, mlp_ratio, np.concatenate(lengths), np.concatenate(modalities)
    )


class MetricWriter:
    """``workdir/metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars;
    written by process 0, through the path layer (a ``gs://`` workdir works).

    The file is rewritten whole at each row (atomically, see ``paths.write_text_atomic``): object
    stores cannot append, and a reader never sees a torn line. ``start`` drops rows past the
    step a resumed run restarts from, and TensorBoard discards its events past it too.
    """

    def __init__(self, workdir, *, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._lines: list[str] = []
        if not enabled:
            return
        workdir = paths.resolve(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / "metrics.jsonl"
        if self._path.exists():
            self._lines = [json.dumps(r) for r in read_metrics(self._path) if r["step"] <= start]
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start + 1 if start else None)

    def write(self, step: int, values: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in values.items()}}
        self._lines.append(json.dumps(row))
        paths.write_text_atomic(self._path, "\n".join(self._lines) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def device_bytes(compiled) -> int | None:
    """Memory one device holds for a compiled step: arguments + outputs + temporaries, less the
    donated buffers the outputs reuse; None where the backend does not say."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.jsonl``. A torn last line (a crash mid-write by an older version)
    is dropped with a warning; a bad line elsewhere raises naming the file and line."""
    path = paths.resolve(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line", path)
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def _py(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
