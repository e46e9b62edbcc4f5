"""One-shot accelerator check (minutes): correctness and speed of the attention kernels.

    python tools/device_check.py                      # sections kernels + train on the local GPU
    python tools/device_check.py --dry-run            # CPU: tiny shapes, XLA path, same code
    python tools/device_check.py --section kernels --seq-lens 4096 8192 --segments 1 8 64

Section `kernels`:
  1. environment: jax/jaxlib/plugin versions, devices, triton / jax-triton and what is missing;
  2. checks the Triton kernel (`impl="triton_gpu"`) against the dense reference
     (`kernels/reference.py`, fp32) on packed rows — forward and gradients, bf16 (relative
     L2 <= 2e-2) and fp32 (max abs <= 1e-4);
  3. times the kernel vs the XLA path (bounded by the row's longest segment) vs the dense
     reference, forward and forward+backward, on packed rows of 4096-32768 tokens holding 1, 8
     and 64 equal segments and one realistic packed layout (tools/bench_kernels.py), and prints a
     table: ms, TFLOP/s on useful work (4 * H * D * sum(len^2) forward, 2.5x that backward),
     TFLOP/s on the blocks the kernel computes, and the fraction of blocks skipped.
Section `train`: a few steps of the real sharded train step (ViT-S/14 and B/14, bf16 compute,
the kernel under test) on packed rows of the paper's mix: step time, tokens/s, MFU, compile time.
Section `e2e` (not in the default set): the launcher on the demo data, real Grain pipeline, then
a resume from its checkpoint (`--e2e-*` options); it takes minutes, half of them in the first
step (compile, loader start), hence `--e2e-timeout`.
Sections are functions in SECTIONS (`name -> fn(args) -> ok`).
Exit status 0 when every check passed, 1 otherwise, 2 when something needed is missing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MISSING = []  # human-readable lines about what is not installed / not usable


# ----------------------------------------------------------------------------- environment


def _version(mod):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - we report anything
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:160]})"


def environment(args) -> dict:
    import jax

    info = {"python": sys.version.split()[0], "jax": jax.__version__}
    import jaxlib

    info["jaxlib"] = jaxlib.__version__
    for mod in (
        "jax_cuda13_plugin",
        "jax_cuda12_plugin",
        "triton",
        "jax_triton",
        "torch",
        "libtpu",
    ):
        info[mod] = _version(mod)
    info["backend"] = jax.default_backend()
    devs = jax.devices()
    info["devices"] = f"{len(devs)} x {devs[0].device_kind}"
    for k, v in info.items():
        print(f"  {k:18s} {v}")
    if not args.dry_run:
        want = {"triton_gpu": "gpu", "pallas_tpu": "tpu"}.get(args.impl)
        if want and info["backend"] != want:
            MISSING.append(
                f"impl={args.impl} needs a {want.upper()} backend but jax.default_backend() = "
                f"{info['backend']!r}"
                + (
                    f"; install 'jax[cuda13]' (or cuda12) matching jax {jax.__version__}"
                    if want == "gpu"
                    else ""
                )
            )
        if args.impl == "triton_gpu":
            if str(info["triton"]).startswith("missing"):
                MISSING.append("triton is not installed: pip install triton")
            if str(info["jax_triton"]).startswith("missing"):
                MISSING.append(
                    "jax-triton is not importable: pip install jax-triton "
                    "(0.3.x for jax 0.10, 0.4.x for jax >= 0.11); " + str(info["jax_triton"])
                )
    return info


# ----------------------------------------------------------------------------- attention variants


def _impls(args, max_len):
    """name -> fn(q, k, v, seg), in table order. The 'kernel' slot is the XLA path on dry runs."""
    from mmv_jax.kernels.attention import segment_attention
    from mmv_jax.kernels.reference import segment_attention_reference

    out = {}
    kernel_impl = "xla" if args.dry_run else args.impl
    if args.kernel_ok and kernel_impl == "pallas_tpu":  # pass the static span bound
        from mmv_jax.kernels.pallas_tpu import segment_attention_pallas

        out["kernel"] = lambda q, k, v, s: segment_attention_pallas(
            q, k, v, s, max_segment_len=max_len
        )
    elif args.kernel_ok:
        out["kernel"] = lambda q, k, v, s: segment_attention(q, k, v, s, impl=kernel_impl)
    out["xla"] = lambda q, k, v, s: segment_attention(
        q, k, v, s, impl="xla", max_segment_len=max_len
    )
    out["dense"] = segment_attention_reference
    return out


# ----------------------------------------------------------------------------- layouts


def layouts(seq_len, segments, *, include_packed=True):
    import bench_kernels

    rows = [(f"{n} seg", bench_kernels.synthetic_row(seq_len, n)[None]) for n in segments]
    if include_packed and seq_len >= 512:  # a 3D view is up to 512 tokens
        rows.append(("packed mix", bench_kernels.packed_layouts(seq_len, batches=1, seed=0)[:1]))
    return rows


def _max_len(seg):
    ids, counts = np.unique(seg[seg != 0], return_counts=True)
    return int(counts.max()) if counts.size else 1


# ----------------------------------------------------------------------------- correctness


def check_correctness(args) -> bool:
    import jax.numpy as jnp

    from mmv_jax.kernels.attention import segment_attention
    from mmv_jax.kernels.reference import outputs_and_grads, segment_attention_reference

    ok_all = True
    s = args.check_seq
    seg = np.concatenate([lay for _, lay in layouts(s, [1, 5])])
    seg[0, -100:] = 0  # padding at the end of a row
    segj = jnp.asarray(seg)
    kernel_impl = "xla" if args.dry_run else args.impl
    rng = np.random.default_rng(0)
    for d in args.check_head_dims:
        for dtype, tol in ((jnp.bfloat16, 2e-2), (jnp.float32, 1e-4)):
            q, k, v = (
                jnp.asarray(
                    rng.standard_normal((len(seg), s, args.check_heads, d)), jnp.float32
                ).astype(dtype)
                for _ in range(3)
            )
            cand = lambda q, k, v, sg: segment_attention(q, k, v, sg, impl=kernel_impl)
            label = f"{kernel_impl} vs reference  D={d} {jnp.dtype(dtype).name:8s}"
            try:
                want = outputs_and_grads(segment_attention_reference, q, k, v, segj, reference=True)
                got = outputs_and_grads(cand, q, k, v, segj)
                errs = []
                for g, r in zip(got, want):
                    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
                    if not np.isfinite(g).all():
                        errs.append(float("nan"))
                    elif dtype == jnp.float32:
                        errs.append(float(np.abs(g - r).max()))
                    else:
                        errs.append(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)))
                ok = all(e <= tol for e in errs)  # NaN fails
                kind = "max abs" if dtype == jnp.float32 else "rel L2"
                print(
                    f"  {'PASS' if ok else 'FAIL'}  {label}  {kind} o/dq/dk/dv = "
                    + " ".join(f"{e:.2e}" for e in errs)
                    + f"  (tol {tol:g})"
                )
            except Exception as e:  # noqa: BLE001
                ok = False
                print(f"  FAIL  {label}  {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                if args.verbose:
                    traceback.print_exc()
            ok_all &= ok
    return ok_all


# ----------------------------------------------------------------------------- timing


def time_kernels(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from benchlib import block_counts, time_fn, useful_fraction

    rng = np.random.default_rng(1)
    h, d = args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    block_q, block_k = args.skip_blocks
    rows = []
    hdr = (
        f"  {'S':>6} {'layout':>10} {'skip':>6} {'impl':>7} {'pass':>8} {'ms':>9} "
        f"{'TF/s useful':>11} {'TF/s blocks':>11}"
    )
    print(hdr)
    for s in args.seq_lens:
        for name, seg in layouts(s, args.segments):
            segj = jnp.asarray(seg)
            useful = useful_fraction(seg) * seg.size * s  # sum of len^2 over the segments
            computed, total = block_counts(seg, block_q, block_k)
            skipped = 1.0 - computed / total
            fl_useful = 4.0 * h * d * useful
            fl_blocks = 4.0 * h * d * computed * block_q * block_k
            q, k, v = (
                jnp.asarray(rng.standard_normal((1, s, h, d)), jnp.float32).astype(dtype)
                for _ in range(3)
            )
            for impl, fn in _impls(args, _max_len(seg)).items():
                if impl == "dense" and s > args.dense_max_seq:
                    continue
                for pas, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                    if pas == "fwd":
                        f = jax.jit(lambda q, k, v, fn=fn, sg=segj: fn(q, k, v, sg))
                    else:
                        f = jax.jit(
                            jax.grad(
                                lambda q, k, v, fn=fn, sg=segj: jnp.sum(
                                    fn(q, k, v, sg).astype(jnp.float32)
                                ),
                                argnums=(0, 1, 2),
                            )
                        )
                    rec = dict(seq_len=s, layout=name, skipped=skipped, impl=impl, pass_=pas)
                    try:
                        t = time_fn(
                            lambda f=f, a=(q, k, v): jax.block_until_ready(f(*a)), args.repeats
                        )
                        rec.update(
                            ms=1e3 * t,
                            tflops_useful=mult * fl_useful / t / 1e12,
                            tflops_blocks=mult * fl_blocks / t / 1e12,
                        )
                        print(
                            f"  {s:>6} {name:>10} {skipped:>6.3f} {impl:>7} {pas:>8} {1e3 * t:>9.3f} "
                            f"{rec['tflops_useful']:>11.2f} {rec['tflops_blocks']:>11.2f}",
                            flush=True,
                        )
                    except Exception as e:  # noqa: BLE001 - OOM of the dense path is expected at 32k
                        rec.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                        print(
                            f"  {s:>6} {name:>10} {skipped:>6.3f} {impl:>7} {pas:>8}   {rec['error']}",
                            flush=True,
                        )
                    rows.append(rec)
    return rows


# ----------------------------------------------------------------------------- sections


def section_kernels(args) -> bool:
    print("== environment")
    info = environment(args)
    if MISSING:
        print("== MISSING (the kernel under test cannot run; what can run still does)")
        for line in MISSING:
            print("  " + line)
        if info["backend"] == "cpu":
            return False
        args.kernel_ok = False
    ok = True
    if args.kernel_ok:
        print(
            f"== correctness ({'xla (dry run)' if args.dry_run else args.impl} vs the dense reference)"
        )
        ok = check_correctness(args)
    else:
        print(f"== correctness: SKIPPED ({args.impl} unavailable)")
    print(
        f"== timing (1 row, H={args.heads}, D={args.head_dim}, {args.dtype}; skip fraction for "
        f"{args.skip_blocks[0]}x{args.skip_blocks[1]} blocks)"
    )
    time_kernels(args)
    return ok


def section_train(args) -> bool:
    """A few sharded train steps of the real step (bf16 compute, the kernel under test) on a
    packed row of the paper's view mix: tokens/s and MFU against the chip's bf16 peak."""
    import jax
    from bench_train import _config, step_bench
    from benchlib import paper_mix_row

    print("== train steps (real LeJEPA step, sharded over all local devices)")
    ok = True
    rows = []
    for variant in args.train_variants:
        for seq in args.train_seq_lens:
            host_batch, views = paper_mix_row(seq, slots=max(96, seq // 40))
            n = max(v.sample for v in views) + 1
            impl = "xla" if args.dry_run else args.impl
            dtype = "float32" if args.dry_run else "bfloat16"
            cfg = _config(variant, dtype, impl, False, 512)
            if args.dry_run:
                cfg.model.depth = 1
            try:
                r = step_bench(
                    cfg, host_batch, num_samples=n, num_views=10, steps=1 if args.dry_run else 5
                )
            except Exception:  # noqa: BLE001 - report and go on with the next shape
                traceback.print_exc()
                ok = False
                continue
            ok &= bool(np.isfinite(r["loss"]))
            rows.append((variant, seq, r))
    print(
        f"  {'model':8s} {'seq':>6s} {'step ms':>9s} {'tokens/s':>10s} {'MFU':>6s} {'compile s':>9s} {'loss':>8s}"
    )
    for variant, seq, r in rows:
        print(
            f"  {variant:8s} {seq:6d} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} "
            f"{r['mfu']:6.1%} {r['compile_s']:9.1f} {r['loss']:8.4f}"
        )
    print(
        f"  devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"MFU denominator {rows[0][2]['peak_flops'] / 1e12 if rows else 0:.0f} TFLOP/s"
    )
    return ok


def section_e2e(args) -> bool:
    import device_e2e  # the launcher end to end lives in its own module

    return device_e2e.section_e2e(args)


SECTIONS = {"kernels": section_kernels, "train": section_train, "e2e": section_e2e}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", choices=sorted(SECTIONS), nargs="+", default=["kernels", "train"])
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU: tiny shapes, the XLA path in the kernel slot, one repeat",
    )
    ap.add_argument(
        "--impl",
        default="triton_gpu",
        choices=["triton_gpu", "pallas_tpu", "xla"],
        help="the kernel under test (default triton_gpu)",
    )
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--dense-max-seq",
        type=int,
        default=16384,
        help="skip dense attention above this length (S^2 logits)",
    )
    ap.add_argument(
        "--skip-blocks",
        type=int,
        nargs=2,
        default=[128, 64],
        help="block sizes for the skipped-fraction column (Triton forward: 128 64)",
    )
    ap.add_argument("--check-seq", type=int, default=1024)
    ap.add_argument("--check-heads", type=int, default=4)
    ap.add_argument("--check-head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--train-variants", nargs="+", default=["S/14", "B/14"])
    ap.add_argument("--train-seq-lens", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--e2e-steps", type=int, default=20)
    ap.add_argument("--e2e-variant", default="S/14", help="S/14 or B/14 (run once for each)")
    ap.add_argument("--e2e-batch", type=int, nargs=2, default=[96, 32], help="CXR and CT per step")
    ap.add_argument("--e2e-seq-len", type=int, default=65536)
    ap.add_argument(
        "--e2e-long-sides",
        type=int,
        nargs=2,
        default=[224, 112],
        help="X-ray and CT long sides (the paper's)",
    )
    ap.add_argument("--e2e-no-cache", action="store_true", help="train from the original files")
    ap.add_argument("--e2e-workers", type=int, default=-1)
    ap.add_argument("--e2e-images", type=int, default=240, help="demo CXR to write (CT: a third)")
    ap.add_argument("--e2e-timeout", type=float, default=300, help="seconds per launch.train run")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.kernel_ok = True
    if args.dry_run:
        args.seq_lens = [s for s in args.seq_lens if s <= 1024] or [512, 1024]
        args.segments = [n for n in args.segments if n <= 8] or [1, 8]
        args.heads, args.repeats = 2, 1
        args.check_seq, args.check_heads, args.check_head_dims = 512, 2, [64]
        args.train_variants, args.train_seq_lens = ["Ti/14"], [1024]
        args.e2e_steps, args.e2e_variant, args.e2e_batch = 2, "Ti/14", [8, 2]
        args.e2e_seq_len, args.e2e_workers, args.e2e_images = 512, 0, 24
        args.e2e_long_sides = [112, 70]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ok = True
    for name in args.section:
        print(f"#### section {name}")
        ok &= bool(SECTIONS[name](args))
    if MISSING:
        return 2
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
