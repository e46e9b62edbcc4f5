"""``tools/device_check.py --section e2e``: the launcher end to end on this machine (its own
module: device_check.py holds the kernel and step sections)."""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np


def section_e2e(args) -> bool:
    """The launcher end to end on this machine: write the demo data set at the paper's image
    sizes, pre-decode it with `mmv-cache` (unless `--e2e-no-cache`), `launch.train` for
    `--e2e-steps` steps (checkpoint half way and at the end), then again to 1.5x the steps, which
    must resume from the checkpoint. Checks finite losses and the resume step; prints the
    wall-clock tokens/s and MFU of each logged window and the share of it the loop spent
    waiting for data (the real Grain pipeline, `--e2e-workers` loader processes; -1: sized
    from the host). Goal (issue 17): the devices busy >= 90% of the steady windows, i.e.
    end-to-end tokens/s >= 90% of the step's own."""
    import json
    import subprocess
    import tempfile

    print("== launcher end to end (demo data, real pipeline, checkpoint + resume)")
    tmp = tempfile.mkdtemp(prefix="mmv_e2e_")
    data, run = os.path.join(tmp, "data"), os.path.join(tmp, "run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    n = args.e2e_steps
    sides = [
        "--long-side-2d",
        str(args.e2e_long_sides[0]),
        "--long-side-3d",
        str(args.e2e_long_sides[1]),
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mmv_jax.data.synthetic",
            "--out",
            data,
            "--n-cxr",
            str(args.e2e_images),
            "--n-ct",
            str(args.e2e_images // 3),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=root,
    )
    source = [f"--config.data.manifest={data}/manifest.jsonl"]
    if not args.e2e_no_cache:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mmv_jax.data.cache",
                "--manifest",
                f"{data}/manifest.jsonl",
                "--out",
                f"{data}/cache",
                *sides,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=root,
        )
        source = [f"--config.data.cache_dir={data}/cache"]
    base = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        "configs/demo.py",
        "--workdir",
        run,
        *source,
        f"--config.model.variant={args.e2e_variant}",
        f"--config.model.dtype={'float32' if args.dry_run else 'bfloat16'}",
        f"--config.data.patch_dtype={'float32' if args.dry_run else 'bfloat16'}",
        f"--config.data.views.long_side_2d={args.e2e_long_sides[0]}",
        f"--config.data.views.long_side_3d={args.e2e_long_sides[1]}",
        f"--config.data.cxr_per_batch={args.e2e_batch[0]}",
        f"--config.data.ct_per_batch={args.e2e_batch[1]}",
        f"--config.data.buckets.seq_len={args.e2e_seq_len}",
        f"--config.data.buckets.slots={max(128, args.e2e_seq_len // 32)}",
        f"--config.data.buckets.nominal_cxr_shape=(1,{args.e2e_long_sides[0]},{args.e2e_long_sides[0]})",
        "--config.data.buckets.nominal_ct_shape=({0},{0},{0})".format(args.e2e_long_sides[1]),
        f"--config.data.worker_count={args.e2e_workers}",
        "--config.eval_every_steps=0",
        f"--config.checkpoint_every_steps={max(1, n // 2)}",
        f"--config.log_every_steps={max(1, n // 4)}",
        f"--config.optim.warmup_steps={max(1, n // 4)}",
    ]
    logs = os.environ.get("OUT") or tmp  # the device tool brings $OUT back
    ok = True
    for total in (n, n + max(1, n // 2)):
        t = time.time()
        log_path = os.path.join(logs, f"e2e_train_to_{total}.log")
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(
                    base + [f"--config.total_steps={total}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=args.e2e_timeout,
                    cwd=root,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout ({args.e2e_timeout} s)"
        out = open(log_path).read().splitlines()
        print(
            f"  launch.train to step {total}: exit {rc} in {time.time() - t:.0f} s "
            f"(log: {log_path})",
            flush=True,
        )
        if rc:
            print("\n".join("    " + line for line in out[-25:]))
            ok = False
            break
        resumed = [line for line in out if "resumed from" in line]
        if total > n:
            ok &= bool(resumed) and resumed[-1].rstrip().endswith(f"step {n}")
            print(f"  resume: {resumed[-1].split('resumed ')[-1] if resumed else 'NOT RESUMED'}")
    path = os.path.join(run, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    ok &= bool(rows) and steps == sorted(set(steps)) and all(np.isfinite(r["loss"]) for r in rows)
    print(
        f"  {'step':>5} {'loss':>8} {'step ms':>8} {'tokens/s':>9} {'MFU':>6} {'busy':>5} {'rows':>4}"
    )
    busy = []
    for r in rows:
        b = 1 - r["data_wait_s"] / r["window_s"] if r["window_s"] else 0.0
        busy.append(b)
        print(
            f"  {r['step']:5d} {r['loss']:8.4f} {1e3 * r['step_s']:8.1f} {r['tokens_per_s']:9.0f} "
            f"{r['mfu']:6.1%} {b:5.0%} {r['rows']:4d}"
        )
    # the first window of each launch holds the loader's start and the compile
    steady = [b for r, b in zip(rows, busy) if r["window_steps"] and "compile_s" not in r]
    fed = bool(steady) and min(steady) >= 0.9
    print(f"  {'PASS' if ok else 'FAIL'}  finite losses, one row per window, resumed at step {n}")
    print(
        f"  {'PASS' if fed else 'FAIL'}  devices busy >= 90% of the steady windows "
        f"(min {min(steady) if steady else 0:.0%})"
    )
    for d in (data, run):  # the logs stay
        shutil.rmtree(d, ignore_errors=True)
    return ok and (fed or args.dry_run)  # a CPU dry run has no accelerator to keep busy
