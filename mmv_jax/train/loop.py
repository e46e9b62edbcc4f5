"""``train_and_evaluate(config, workdir)``: the one training loop for CPU, GPU clusters and pods.

Resumes from ``workdir/checkpoints`` when a checkpoint is there (train state and data iterator,
on any topology); otherwise starts fresh, from ``config.init_from``'s params when set. Writes
``workdir/metrics.jsonl``, TensorBoard events, ``config.json`` and ``run_info.json``; checkpoints
every ``checkpoint_every_steps``, at the end, and on preemption (SIGTERM to any process: with
several processes all of them save the same step, then exit). ``workdir`` may be a URI
(``gs://bucket/run``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import signal
import time

import jax
import numpy as np

from mmv_jax import paths
from mmv_jax.data import pipeline
from mmv_jax.errors import ConfigError, DivergedError
from mmv_jax.train import (
    checkpoint,
    distributed,
    metrics,
    sharding as shd,
    state as st,
    workdir as wd,
)
from mmv_jax.train.evaluate import Evaluator
from mmv_jax.train.feed import DeviceFeed
from mmv_jax.train.step import setup

log = logging.getLogger(__name__)


def _require(ok: bool, key: str, what: str, value) -> None:
    if not ok:
        raise ConfigError(f"config.{key} must be {what}, got {value!r}")


def validate(cfg) -> None:
    """Fails before any compile, naming the config key."""
    for key in (
        "total_steps",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "prefetch_to_device",
    ):
        _require(int(cfg[key]) > 0, key, "positive", cfg[key])
    o = cfg.optim
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    _require(finite(o.lr) and o.lr > 0, "optim.lr", "a positive finite number", o.lr)
    _require(int(o.warmup_steps) >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)
    for key in ("b1", "b2"):
        _require(finite(o[key]) and 0 <= o[key] < 1, f"optim.{key}", "in [0, 1)", o[key])
    _require(finite(o.eps) and o.eps > 0, "optim.eps", "positive", o.eps)
    for key in ("weight_decay", "grad_clip"):
        _require(finite(o[key]) and o[key] >= 0, f"optim.{key}", ">= 0", o[key])
    _require(
        finite(o.final_lr_ratio) and 0 <= o.final_lr_ratio <= 1,
        "optim.final_lr_ratio",
        "in [0, 1]",
        o.final_lr_ratio,
    )
    _require(finite(cfg.loss.lam) and cfg.loss.lam >= 0, "loss.lam", ">= 0", cfg.loss.lam)
    _require(int(cfg.loss.num_slices) >= 1, "loss.num_slices", ">= 1", cfg.loss.num_slices)
    _require(
        cfg.require_platform in distributed.PLATFORMS,
        "require_platform",
        f"one of {distributed.PLATFORMS}",
        cfg.require_platform,
    )
    if cfg.init_from and not paths.resolve(cfg.init_from).exists():
        raise ConfigError(f"config.init_from={cfg.init_from!r} does not exist")
    pipeline.validate_config(cfg.data)
    manifest = pipeline.manifest_path(cfg.data)
    if not paths.resolve(manifest).exists():
        raise ConfigError(f"config.data.manifest={manifest!r} does not exist")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            f"config.model.dtype must be float32/bfloat16/float16, got {cfg.model.dtype!r}"
        )
    st.encoder_config_from(cfg)  # raises on model.variant / attention_impl


class _Sigterm:
    """Single process: SIGTERM sets a flag that the loop reads at the end of each step. (With
    several processes JAX's own preemption notifier owns SIGTERM: ``distributed.preemption_requested``.)"""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def __call__(self, step: int) -> bool:
        return self.requested

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def _diverged(ckpt, cfg, step: int, streak_start: int) -> str:
    """Stops a diverged run: drops any checkpoint of the state that led into the non-finite
    streak (the step before it), so a rerun resumes from the last healthy one."""
    dropped = [s for s in ckpt.all_steps() if s >= streak_start - 1]
    for s in dropped:
        ckpt.delete(s)
    healthy = ckpt.latest_step()
    removed = f"Removed checkpoint(s) {dropped} of the diverging state. " if dropped else ""
    resume = (
        f"A rerun resumes from the healthy checkpoint at step {healthy}."
        if healthy is not None
        else "No healthy checkpoint is left; a rerun starts afresh."
    )
    return (
        f"{cfg.max_nonfinite_steps} consecutive non-finite steps from step {streak_start} "
        f"(config.max_nonfinite_steps); stopping at step {step}. {removed}{resume} Lower "
        f"config.optim.lr (rerun with --config.allow_config_change=True) or check the data."
    )


class _Window:
    """What happened since the last metrics row (wall clock, so data waits count)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps, self.tokens, self.flops, self.data_wait_s = 0, 0, 0.0, 0.0

    def add(self, stats, flops: float):
        self.steps += 1
        self.tokens += int(stats["real_tokens"])
        self.flops += flops

    def row(self, peak: float, compile_s: float | None) -> dict:
        wall = time.perf_counter() - self.t0
        out = dict(
            time=time.time(),
            window_steps=self.steps,
            window_tokens=self.tokens,
            window_s=wall,
            tokens_per_s=self.tokens / wall if wall else 0.0,
            step_s=wall / self.steps if self.steps else 0.0,
            data_wait_s=self.data_wait_s,
            mfu=self.flops / wall / peak if wall else 0.0,
        )
        if compile_s is not None:
            out["compile_s"] = compile_s
        return out


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def start(cfg) -> str:
    """Checks the config, joins the other processes and checks the platform (returned)."""
    validate(cfg)
    distributed.initialize(cfg.distributed)
    return distributed.check_platform(cfg.require_platform)


def build_step(cfg, mesh, *, abstract: bool = False, process_count: int | None = None):
    """The step of a run on ``mesh`` (a run, ``mmv-train --dry_run``, ``tools/aot_compile.py``):
    ``(step, state, state_shardings, batch_shardings)``. Sets ``cfg.data.rows_multiple_of`` so
    each process's rows split evenly over its share of the batch axes. ``abstract=True``:
    shape-only state; ``process_count``: default this run's."""
    nproc = jax.process_count() if process_count is None else process_count
    multiple = shd.rows_per_process_multiple(mesh, shd.rules_dict(cfg.mesh.rules), nproc)
    cfg.data.rows_multiple_of = math.lcm(int(cfg.data.rows_multiple_of), multiple)
    return setup(
        cfg,
        mesh,
        abstract=abstract,
        num_samples=pipeline.num_samples_global(cfg.data, nproc),
        num_views=pipeline.num_views_per_sample(cfg.data),
    )


def train_iterator(cfg):
    """This process's train iterator (after :func:`build_step`); sets ``cfg.data.worker_count``."""
    nproc = jax.process_count()
    cfg.data.worker_count = pipeline.workers(cfg.data, jax.local_device_count())
    return pipeline.make_train_iterator(
        cfg.data,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=nproc,
        gather=distributed.KVAllgather() if nproc > 1 else None,
    )


def train_and_evaluate(cfg, workdir) -> dict:
    platform = start(cfg)
    workdir = paths.resolve(workdir)
    lock = _acquire_lock(cfg, workdir)
    try:
        return _train(cfg, workdir, platform, lock)
    finally:
        lock.release()


def _acquire_lock(cfg, workdir) -> wd.Lock:
    """Process 0 takes the run folder's lock; every process learns whether it could."""
    lock = wd.Lock(workdir, stale_s=cfg.lock_stale_s)
    busy = None
    try:
        lock.acquire()
    except wd.WorkdirBusy as e:
        busy = e
    if distributed.host_allgather(np.array([busy is not None])).any():
        raise busy or wd.WorkdirBusy(
            f"{workdir} is in use by another trainer (see process 0's log)"
        )
    return lock


def _train(cfg, workdir, platform, lock) -> dict:
    mesh = shd.make_mesh(cfg.mesh.shape)
    evaluator = Evaluator(cfg, workdir, mesh)
    proc, nproc = jax.process_index(), jax.process_count()
    step_fn, state, state_sh, batch_sh = build_step(cfg, mesh)
    log.info(
        "%s: %d x %s in %d process(es); mesh %s",
        platform,
        jax.device_count(),
        jax.devices()[0].device_kind,
        nproc,
        dict(mesh.shape),
    )
    log.debug("parameter shardings:\n%s", shd.describe(state_sh.params))
    it = train_iterator(cfg)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing
    )
    wd.check_and_record_config(cfg, workdir, resuming=ckpt.latest_step() is not None)
    start, restored, data_state = ckpt.restore_latest_intact(
        checkpoint.abstract_of(state, state_sh)
    )
    if start is not None:
        state = restored
        it.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start = 0
        if cfg.init_from:
            try:
                params = checkpoint.load_params(
                    cfg.init_from, checkpoint.abstract_of(state.params, state_sh.params)
                )
            except FileNotFoundError as e:
                raise ConfigError(f"config.init_from: {e}") from None
            state = state._replace(params=params)
    wd.record_start(workdir, start, platform)
    writer = metrics.MetricWriter(workdir, start=start, enabled=proc == 0)
    if start >= cfg.total_steps:
        done = (
            [r for r in metrics.read_metrics(workdir / "metrics.jsonl")]
            if proc == 0 and (workdir / "metrics.jsonl").exists()
            else []
        )
        log.info("run already finished at step %d (config.total_steps=%d)", start, cfg.total_steps)
        it.close()
        ckpt.close()
        writer.close()
        return dict(done[-1], already_finished=True) if done else {"already_finished": True}

    enc = st.encoder_config_from(cfg)
    peak = metrics.peak_flops(cfg.peak_flops_per_device, cfg.model.dtype)
    sigterm = _Sigterm() if nproc == 1 else None
    preempted = sigterm or distributed.preemption_requested
    feed = DeviceFeed(
        it, batch_sh, depth=int(cfg.prefetch_to_device), limit=cfg.total_steps - start
    )
    window = _Window()
    in_flight: collections.deque = collections.deque()
    last, compile_s, first_row = {}, None, True
    try:
        for step in range(start + 1, cfg.total_steps + 1):
            batch, host_batch, stats, data_state = feed.get()
            log_step = step % cfg.log_every_steps == 0 or step == cfg.total_steps
            eval_step = evaluator.due(step)
            stop = preempted(step)
            save = step % cfg.checkpoint_every_steps == 0 or step == cfg.total_steps or stop
            # Between log and checkpoint steps nothing comes back from the devices: the step is
            # dispatched and the loop goes on to draw the next batch while it runs.
            with (
                contextlib.nullcontext()
                if log_step or save or eval_step or compile_s is None
                else jax.transfer_guard_device_to_host("disallow")
            ):
                t_dispatch = time.perf_counter()
                state, m = step_fn(state, batch)
                in_flight.append(m["loss"])
                if compile_s is None:  # the first step of a process includes its compile
                    jax.block_until_ready(m["loss"])
                    compile_s = time.perf_counter() - t_dispatch
                    feed.take_wait()
                    window = _Window()
                    in_flight.clear()
                else:
                    window.add(
                        stats,
                        metrics.batch_flops(host_batch, enc.width, enc.depth, enc.mlp_ratio)
                        * nproc,
                    )
                feed.fill()
                while len(in_flight) > feed.depth:  # back-pressure: a wait, not a transfer
                    jax.block_until_ready(in_flight.popleft())
            if not (log_step or save or eval_step):
                continue
            nonfinite = int(state.nonfinite)  # the length of the current non-finite run
            if log_step:
                window.data_wait_s += feed.take_wait()
                last = {k: float(v) for k, v in jax.device_get(m).items() if k != "finite"}
                last.update(window.row(peak, compile_s if first_row else None))
                first_row = False
                last.update(
                    packing_efficiency=float(stats["packing_efficiency"]),
                    bad_files=int(stats["bad_files"]),
                    compiles=step_fn.compiles,
                    rows=int(stats["rows"]),
                    bucket_agree_s=float(stats["agree_s"]),
                    wire_bytes=int(stats["wire_bytes"]),
                    nonfinite_run=nonfinite,
                )
                writer.write(step, last)
                lock.refresh()
                if nonfinite:
                    log.warning(
                        "step %d: non-finite loss or gradient in the last %d step(s), "
                        "updates skipped",
                        step,
                        nonfinite,
                    )
                if proc == 0:
                    eta = (cfg.total_steps - step) * last["step_s"]
                    print(
                        f"step {step}/{cfg.total_steps}  loss {last['loss']:.4f}  "
                        f"tokens/s {last['tokens_per_s']:,.0f}  mfu {last['mfu']:.3f}  "
                        f"data wait {last['data_wait_s']:.1f}s  eta {_eta(eta)}",
                        flush=True,
                    )
                window = _Window()
            if eval_step:
                t_eval = time.perf_counter()
                writer.write(step, evaluator.maybe_run(step, state))
                window.t0 += time.perf_counter() - t_eval  # the eval is not training time
            if nonfinite >= cfg.max_nonfinite_steps:
                raise DivergedError(_diverged(ckpt, cfg, step, step - nonfinite + 1))
            if save:
                if nonfinite:  # never replace healthy checkpoints with a diverging state
                    log.warning("step %d: no checkpoint during a run of non-finite steps", step)
                else:
                    ckpt.save(step, state, data_state, force=stop)
            if stop:
                log.warning(
                    "preemption (SIGTERM): %s at step %d, exiting",
                    "no checkpoint written (a run of non-finite steps)"
                    if nonfinite
                    else "checkpoint written",
                    step,
                )
                last = dict(last, step=step, preempted=True)
                break
    finally:
        it.close()
        ckpt.close()
        writer.close()
        if sigterm:
            sigterm.restore()
    return last
