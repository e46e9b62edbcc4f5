"""``train_and_evaluate(config, workdir)``: the one training loop for CPU, GPU clusters and pods.

Resumes from ``workdir/checkpoints`` when a checkpoint is there (train state and data iterator);
otherwise starts fresh, from ``config.init_from``'s params when set. Writes
``workdir/metrics.jsonl`` and TensorBoard events; checkpoints every
``checkpoint_every_steps``, at the end, and on SIGTERM (preemption).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmv_jax.data import pipeline
from mmv_jax.train import checkpoint, distributed, metrics, sharding as shd, state as st
from mmv_jax.train.step import setup

log = logging.getLogger(__name__)


def validate(cfg) -> None:
    """Fails before any compile, naming the config key."""
    for key in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
        if int(cfg[key]) <= 0:
            raise ValueError(f"config.{key} must be positive, got {cfg[key]}")
    if cfg.init_from and not os.path.exists(cfg.init_from):
        raise ValueError(f"config.init_from={cfg.init_from!r} does not exist")
    pipeline.validate_config(cfg.data)
    manifest = pipeline.manifest_path(cfg.data)
    if not os.path.exists(manifest):
        raise ValueError(f"config.data.manifest={manifest!r} does not exist")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config.model.dtype must be float32/bfloat16/float16, got {cfg.model.dtype!r}")
    st.encoder_config_from(cfg)  # raises on model.variant / attention_impl


class _Preemption:
    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def _log_stats(host_batch, stats: dict) -> dict:
    """Tokens and bad-file counts of this step, summed over processes."""
    keys = ("real_tokens", "capacity_tokens", "bad_files")
    seg = np.asarray(host_batch.segment_ids)
    local = np.array([float((seg > 0).sum()), float(seg.size), float(stats.get("bad_files", 0))])
    total = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys)).sum(0) \
        if jax.process_count() > 1 else local
    return dict(zip(keys, total))


def train_and_evaluate(cfg, workdir: str) -> dict:
    validate(cfg)
    distributed.initialize(cfg.distributed)
    mesh = shd.make_mesh(cfg.mesh.shape)
    rules = shd.rules_dict(cfg.mesh.rules)
    proc, nproc = jax.process_index(), jax.process_count()
    multiple = shd.rows_per_process_multiple(mesh, rules, nproc)
    cfg.data.rows_multiple_of = math.lcm(int(cfg.data.rows_multiple_of), multiple)
    step_fn, state, state_sh, batch_sh = setup(
        cfg, mesh, num_samples=pipeline.num_samples_global(cfg.data, nproc),
        num_views=pipeline.num_views_per_sample(cfg.data))
    log.info("mesh %s; parameter shardings:\n%s", dict(mesh.shape), shd.describe(state_sh.params))
    it = pipeline.make_train_iterator(cfg.data, seed=cfg.seed, process_index=proc, process_count=nproc)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                                   async_save=cfg.async_checkpointing)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, checkpoint.abstract_of(state, state_sh), it)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start = 0
        if cfg.init_from:
            params = checkpoint.load_params(cfg.init_from, checkpoint.abstract_of(state.params, state_sh.params))
            state = state._replace(params=params)

    writer = metrics.MetricWriter(workdir, enabled=proc == 0)
    if proc == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json(indent=1))
    writer.truncate_after(start)
    enc = st.encoder_config_from(cfg)
    peak = metrics.peak_flops_per_device(cfg.peak_flops_per_device) * jax.device_count()

    preempt = _Preemption()
    bar = _progress(cfg, start)
    window = {"tokens": 0.0, "flops": 0.0, "time": 0.0}
    last = {}
    try:
        for step in range(start + 1, cfg.total_steps + 1):
            host_batch, stats = next(it)
            t0 = time.perf_counter()
            state, m = step_fn(state, shd.global_batch(host_batch, batch_sh))
            jax.block_until_ready(state.step)
            dt = time.perf_counter() - t0
            counts = _log_stats(host_batch, stats)
            if step > start + 1:  # the first step of a process includes its compile
                window["time"] += dt
                window["tokens"] += counts["real_tokens"]
                window["flops"] += metrics.batch_flops(host_batch, enc.width, enc.depth, enc.mlp_ratio) * nproc
            nonfinite = int(state.nonfinite)
            if not bool(m["finite"]):
                log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, nonfinite)
            if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
                last = {k: float(v) for k, v in jax.device_get(m).items() if k != "finite"}
                rate = window["tokens"] / window["time"] if window["time"] else 0.0
                last.update(
                    tokens_per_s=rate,
                    mfu=window["flops"] / window["time"] / peak if window["time"] else 0.0,
                    packing_efficiency=counts["real_tokens"] / max(counts["capacity_tokens"], 1),
                    bad_files=int(counts["bad_files"]), compiles=step_fn.compiles,
                    step_s=dt, rows=int(np.asarray(host_batch.segment_ids).shape[0]) * nproc)
                writer.write(step, last)
                window = dict.fromkeys(window, 0.0)
                if bar:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{rate:.0f}")
            if bar:
                bar.update(1)
            if nonfinite >= cfg.max_nonfinite_steps:
                raise RuntimeError(f"{nonfinite} consecutive non-finite steps (config.max_nonfinite_steps="
                                   f"{cfg.max_nonfinite_steps}); stopping at step {step}")
            if step % cfg.checkpoint_every_steps == 0 or step == cfg.total_steps or preempt.requested:
                ckpt.save(step, state, it, force=preempt.requested)
            if preempt.requested:
                log.warning("SIGTERM: checkpoint written at step %d, exiting", step)
                break
    finally:
        it.close()
        ckpt.close()
        writer.close()
        preempt.restore()
        if bar:
            bar.close()
    return last


def _progress(cfg, start: int):
    if not (cfg.progress_bar and sys.stderr.isatty() and jax.process_index() == 0):
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True)
