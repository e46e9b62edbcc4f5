"""``bench.py torch``: the same ViT-S/14 train step (forward, backward, AdamW) on the same packed
row of the paper's mix, PyTorch (mmv_jax.torch) vs mmv_jax, on this machine in one run.

JAX side: the real train step (``mmv_jax.train.step.jit_train_step`` over a full TrainState:
LeJEPA loss, global-norm clipping, AdamW with the weight-decay mask), fp32, XLA attention with
block skipping bounded by the largest view. PyTorch side: the same model, loss (same projector,
256 SIGReg directions), clipping and AdamW, starting from the JAX initial params (converted by
``mmv_jax.torch.names``; the step-0 losses of both sides, with the same directions, are reported
and agree), with both natural CPU attention paths: SDPA once per
segment (``varlen``) and SDPA with a dense block mask (``mask``); the faster one counts.

Sides take turns (round-robin), so load swings on a shared machine hit every side alike. Each
turn runs ``--rewarm`` untimed steps before the timed one: the first step after the other
framework ran is slower than a training run's steady state, on both sides (memory the other
side took and freed is the likely cause). The dense-mask
path comes last, on its own (it slows whatever runs after it by more). ``*_tokens_per_s`` and
``ratio`` use the median timed step; ``*_best_tokens_per_s`` and ``ratio_best_of`` the fastest
(the least disturbed one); ``*_cpu_s`` is process CPU time a step. Tokens are real (non-padding)
tokens. ``glibc_tunables`` says whether both sides ran with huge pages (``mmv_jax/hugepages.py``:
they speed up the JAX step and slow the PyTorch one, so the ratio depends on them);
``MMV_HUGEPAGES=0`` runs both without.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from benchlib import encoder_flops, paper_mix_row

from mmv_jax.model.encoder import encoder_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant: str, max_segment_len: int):
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    import configs.base as base

    c = base.get_config()
    c.model.variant = variant
    c.model.dtype = "float32"
    c.model.attention_impl = "xla"
    c.model.max_segment_len = max_segment_len
    c.optim.warmup_steps = 1
    c.total_steps = 1000
    return c


def _jax_setup(cfg, batch, num_samples, num_views):
    import jax

    from mmv_jax.train import sharding as shd
    from mmv_jax.train.step import setup

    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    step, state, _, batch_sh = setup(cfg, mesh, num_samples=num_samples, num_views=num_views)
    return step, state, jax.device_put(batch, batch_sh)


def _first_directions(state, dim, slices):
    """The SIGReg directions the JAX step draws at step 0."""
    import jax

    from mmv_jax.objectives.lejepa import sigreg_directions

    return np.asarray(sigreg_directions(jax.random.fold_in(state.rng, state.step), dim, slices))


def _jax_stepper(step, state, dev_batch):
    """A blocking ``call()`` doing one JAX train step; ``losses`` collects each step's loss."""
    import jax

    box, losses = {"state": state}, []

    def call():
        box["state"], m = step(box["state"], dev_batch)
        jax.block_until_ready((box["state"].step, m["loss"]))
        losses.append(float(m["loss"]))

    return call, losses


def _torch_stepper(cfg, params, batch, num_samples, num_views, impl, first_dirs, seed=0):
    """Same for PyTorch; ``params``: the JAX initial params (pure dict), loaded through
    ``mmv_jax.torch.names``; step 0 uses the JAX step's step-0 SIGReg directions."""
    import torch

    import mmv_jax.torch as tr
    from mmv_jax.torch.names import jax_to_torch

    m = cfg.model
    model = tr.MultiMedVisionTorch.from_variant(
        m.variant,
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
        proj_layers=m.proj_layers,
        proj_norm=m.get("proj_norm", "layer"),
    )
    model.load_state_dict(
        {k: torch.tensor(v) for k, v in jax_to_torch(params).items()}, strict=True
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
    )
    tb = type(batch)(*(torch.from_numpy(np.ascontiguousarray(x)) for x in batch))
    gen = torch.Generator().manual_seed(seed)
    losses = []

    def call():
        opt.zero_grad(set_to_none=True)
        _, proj = model(tb, impl=impl)
        dirs = (
            torch.tensor(first_dirs)
            if not losses
            else tr.random_directions(m.proj_dim, cfg.loss.num_slices, gen)
        )
        loss, _ = tr.lejepa_loss(
            proj,
            tb.view_sample,
            tb.view_is_global,
            tb.view_index,
            num_samples=num_samples,
            num_views=num_views,
            lam=cfg.loss.lam,
            directions=dirs,
        )
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))

    return call, losses


def run(argv):
    ap = argparse.ArgumentParser("bench.py torch")
    ap.add_argument("--variant", default="S/14")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument(
        "--reps",
        type=int,
        default=4,
        help="timed steps per side after one warm-up, taken round-robin (median)",
    )
    ap.add_argument(
        "--rewarm",
        type=int,
        default=1,
        help="untimed steps of a side at the start of each of its turns",
    )
    ap.add_argument("--paths", default="varlen,mask", help="PyTorch attention paths to time")
    ap.add_argument("--skip-jax", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: PyTorch's default")
    args = ap.parse_args(argv)

    import jax
    import torch
    from flax import nnx

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    batch, views = paper_mix_row(args.seq_len)
    has_3d = any(v.modality for v in views)
    bound = 512 if has_3d else 256  # as bench.py encoder: the largest view the paper mix can make
    assert max(v.num_tokens for v in views) <= bound
    cfg = _config(args.variant, bound)
    num_samples = int(batch.view_sample.max()) + 1
    num_views = int(batch.view_index.max()) + 1
    tokens = int(sum(v.num_tokens for v in views))
    load_start = os.getloadavg()[0]

    step, state, dev_batch = _jax_setup(cfg, batch, num_samples, num_views)
    params = jax.tree.map(np.array, nnx.to_pure_dict(state.params))  # copies: the step donates
    dirs = _first_directions(state, cfg.model.proj_dim, cfg.loss.num_slices)
    sides = {
        f"torch_{impl}": _torch_stepper(cfg, params, batch, num_samples, num_views, impl, dirs)
        for impl in args.paths.split(",")
    }
    if not args.skip_jax:
        sides["jax"] = _jax_stepper(step, state, dev_batch)
    times = {name: [] for name in sides}
    cpu = {name: [] for name in sides}
    # Interleaved with the dense-mask path (multi-GB temporaries, the likely cause) the JAX step
    # slows by more than one re-warm step absorbs, so that path is warmed up and timed after the
    # others, which are timed round-robin.
    groups = [[n for n in sides if n != "torch_mask"], [n for n in sides if n == "torch_mask"]]
    for group in groups:
        for name in group:
            sides[name][0]()  # warm-up (and the JAX compile)
        for _ in range(args.reps):  # round-robin: a load swing on the shared machine hits all alike
            for name in group:
                for _ in range(args.rewarm if len(group) > 1 else 0):  # alone: already warm
                    sides[name][0]()
                t, c = time.perf_counter(), time.process_time()
                sides[name][0]()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)

    result = {
        "variant": args.variant,
        "seq_len": args.seq_len,
        "real_tokens": tokens,
        "views": len(views),
        "samples": num_samples,
        "max_segment_len": bound,
        "reps": args.reps,
        "rewarm": args.rewarm,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "jax_backend": jax.default_backend(),
    }
    for name, (_, losses) in sides.items():
        sec = float(np.median(times[name]))
        result.update(
            {
                f"{name}_step_s": sec,
                f"{name}_tokens_per_s": tokens / sec,
                f"{name}_step_times_s": [round(x, 3) for x in times[name]],
                f"{name}_best_tokens_per_s": tokens / min(times[name]),
                # CPU seconds of this process a step (all threads; spin-waits included)
                f"{name}_cpu_s": float(np.median(cpu[name])),
                f"{name}_loss_step0": losses[0],
            }
        )
    torch_rates = {
        n[len("torch_") :]: result[f"{n}_tokens_per_s"] for n in sides if n.startswith("torch_")
    }
    best = max(torch_rates, key=torch_rates.get)
    result.update(torch_path=best, torch_tokens_per_s=torch_rates[best])
    if not args.skip_jax:
        best_of = max(result[f"torch_{n}_best_tokens_per_s"] for n in torch_rates)
        result.update(
            jax_compiles=step.compiles,
            ratio=result["jax_tokens_per_s"] / torch_rates[best],
            ratio_best_of=result["jax_best_tokens_per_s"] / best_of,
            jax_path="mmv_jax.train.step.jit_train_step (full TrainState: LeJEPA, clip, AdamW)",
        )
    enc = encoder_config(args.variant)
    result["useful_train_flops"] = 3 * encoder_flops(
        enc.width,
        enc.depth,
        enc.mlp_ratio,
        [v.num_tokens for v in views],
        [v.modality for v in views],
    )
    result["load_avg_1m"] = [load_start, os.getloadavg()[0]]
    return result
