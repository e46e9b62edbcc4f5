"""``bench.py train``: the real sharded train step (LeJEPA, AdamW) on one packed bucket.

ViT-S/14 on one 8192-token row of the paper's view mix: step time, tokens/s, MFU, compile time,
and compiled temp memory (XLA memory analysis) with and without remat; plus the demo config's
step on a real demo batch (``demo`` sub-object).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import paper_mix_row

from mmv_jax.batch import groups, real_tokens
from mmv_jax.train import metrics, sharding as shd, state as st
from mmv_jax.train.step import setup


def _config(variant: str, dtype: str, impl: str, remat: bool, max_len: int):
    import configs.base as base

    c = base.get_config()
    c.model.variant, c.model.dtype, c.model.attention_impl = variant, dtype, impl
    c.model.remat_policy = "nothing_saveable" if remat else "none"
    c.model.max_segment_len = max_len
    c.data.ct_per_batch = 64  # so max_view_tokens covers 3D views
    return c


def step_bench(cfg, host_batch, *, num_samples: int, num_views: int, steps: int = 3) -> dict:
    """Compiles and times the train step on ``host_batch`` over all devices (rows sharded)."""
    mesh = shd.make_mesh(cfg.mesh.shape)
    step, state, _, batch_sh = setup(cfg, mesh, num_samples=num_samples, num_views=num_views)
    batch = shd.global_batch(host_batch, batch_sh)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    enc = st.encoder_config_from(cfg)
    flops = metrics.batch_flops(host_batch, enc.width, enc.depth, enc.mlp_ratio)
    tokens = real_tokens(host_batch)
    peak = metrics.peak_flops(cfg.peak_flops_per_device, cfg.model.dtype)
    return {
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "mfu": flops / step_s / peak,
        "compile_s": compile_s,
        "temp_bytes": temp,
        "loss": float(m["loss"]),
        "peak_flops": peak,
        "real_tokens": tokens,
        "seq_len": int(groups(host_batch)[0].segment_ids.shape[1]),
        "rows": sum(int(g.segment_ids.shape[0]) for g in groups(host_batch)),
    }


def demo_bench(steps: int = 3) -> dict:
    import os
    import tempfile

    import configs.demo as demo
    from mmv_jax.data import pipeline, synthetic

    cfg = demo.get_config()
    if not os.path.exists(cfg.data.manifest):
        out = tempfile.mkdtemp()
        synthetic.main(["--out", out, "--n-cxr", "40", "--n-ct", "16"])
        cfg.data.manifest = os.path.join(out, "manifest.jsonl")
    it = pipeline.make_train_iterator(cfg.data, seed=0)
    host_batch, _ = next(it)
    it.close()
    return step_bench(
        cfg,
        host_batch,
        num_samples=pipeline.num_samples_global(cfg.data),
        num_views=pipeline.num_views_per_sample(cfg.data),
        steps=steps,
    )


def tpu_remat_memory(variant: str, seq_len: int, topology: str = "v5e:2x2") -> dict | None:
    """Compiled temp memory per device of the encoder's forward+backward (bf16, Pallas kernel)
    for a TPU topology, with and without remat (libtpu needed, no TPU): the saving where it
    matters most, beside the CPU figures of :func:`step_bench`."""
    import importlib.util
    import os

    if importlib.util.find_spec("libtpu") is None:
        return None
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from flax import nnx
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    from mmv_jax.model.axes import axis_rules
    from mmv_jax.model.encoder import Encoder, encoder_config

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    mesh = shd.make_mesh((-1, 1, 1), list(topo.devices))
    row, _ = paper_mix_row(seq_len, slots=max(96, seq_len // 40))
    n = len(topo.devices)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rep = NamedSharding(mesh, PartitionSpec())
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype, sharding=rows), row
    )
    out = {"topology": topology}
    for remat in (False, True):
        cfg = encoder_config(
            variant,
            remat_policy="nothing_saveable" if remat else "none",
            max_segment_len=512,
            attention_impl="pallas_tpu",
            dtype="bfloat16",
        )
        graphdef, params = nnx.split(nnx.eval_shape(lambda cfg=cfg: Encoder(cfg, rngs=nnx.Rngs(0))))
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params
        )
        grad = jax.jit(jax.grad(lambda p, b, g=graphdef: jnp.mean(jnp.square(nnx.merge(g, p)(b)))))
        with axis_rules(mesh, shd.rules_dict(shd.DEFAULT_RULES)):
            compiled = grad.lower(params, batch).compile()
        out["temp_bytes_remat" if remat else "temp_bytes"] = int(
            compiled.memory_analysis().temp_size_in_bytes
        )
    out["remat_temp_reduction"] = out["temp_bytes"] / out["temp_bytes_remat"]
    return out


def run(argv):
    ap = argparse.ArgumentParser("bench.py train")
    ap.add_argument("--variant", default="S/14")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-demo", action="store_true")
    args = ap.parse_args(argv)
    host_batch, views = paper_mix_row(args.seq_len, slots=max(96, args.seq_len // 40))
    n = max(v.sample for v in views) + 1
    max_len = 512 if any(v.modality for v in views) else 256
    out = step_bench(
        _config(args.variant, args.dtype, args.impl, False, max_len),
        host_batch,
        num_samples=n,
        num_views=10,
        steps=args.steps,
    )
    remat = step_bench(
        _config(args.variant, args.dtype, args.impl, True, max_len),
        host_batch,
        num_samples=n,
        num_views=10,
        steps=1,
    )
    out.update(
        variant=args.variant,
        temp_bytes_remat=remat["temp_bytes"],
        remat_step_s=remat["step_s"],
        remat_temp_reduction=out["temp_bytes"] / remat["temp_bytes"],
        backend=jax.default_backend(),
        devices=jax.device_count(),
    )
    out["tpu"] = tpu_remat_memory(args.variant, args.seq_len)
    if not args.no_demo:
        out["demo"] = demo_bench(args.steps)
    return out
