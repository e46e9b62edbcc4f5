"""``bench.py encoder``: forward+backward of the encoder on one packed row of the paper's mix."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import encoder_flops, measure_matmul_peak, paper_mix_row, time_fn
from flax import nnx

from mmv_jax.model.encoder import Encoder, encoder_config


def run(argv):
    ap = argparse.ArgumentParser("bench.py encoder")
    ap.add_argument("--variant", default="S/14")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--dense", action="store_true", help="no block skipping (dense masked S x S)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    batch, views = paper_mix_row(args.seq_len)
    has_3d = any(v.modality for v in views)
    max_len = None if args.dense else (512 if has_3d else 256)
    cfg = encoder_config(args.variant, attention_impl=args.impl, max_segment_len=max_len)
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = jax.tree.map(jnp.asarray, batch)

    @jax.jit
    def step(params, batch):
        def loss(p):
            return jnp.mean(jnp.square(nnx.merge(graphdef, p)(batch)))

        return jax.value_and_grad(loss)(params)

    def call():
        jax.block_until_ready(step(params, batch))

    seconds = time_fn(call, args.reps)
    lengths = [v.num_tokens for v in views]
    flops = 3 * encoder_flops(
        cfg.width, cfg.depth, cfg.mlp_ratio, lengths, [v.modality for v in views]
    )
    peak = measure_matmul_peak()
    tokens = int(np.sum(lengths))
    return {
        "variant": args.variant,
        "seq_len": args.seq_len,
        "views": len(views),
        "real_tokens": tokens,
        "max_segment_len": max_len,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "useful_flops": flops,
        "peak_flops": peak,
        "mfu": flops / seconds / peak,
        "backend": jax.default_backend(),
    }
