"""Compile the real sharded train step for a TPU pod topology from any CPU machine.

  python tools/aot_compile.py --config configs/stage3_joint.py --topology v5e:4x4 [--num-slices 2]
      [--config.mesh.shape=-1,1,1 ...]

Needs libtpu (jax's ``tpu`` extra); no TPU. Builds the mesh over the topology's devices, lowers
and compiles the train step at every bucket shape the data config can emit, prints per-device
memory (XLA memory analysis) against the chip's HBM and the step's FLOPs, and ends with one JSON
object: ``fits``, ``bytes_per_device``, ``hbm_bytes``, ``flops``, ``compiled_shapes``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# before JAX is imported (below, in the functions): compile on this CPU for a TPU topology
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no lock on the runtime

HBM_BYTES = {
    "v4": 32 << 30,
    "v5e": 16 << 30,
    "v5litepod": 16 << 30,
    "v5p": 95 << 30,
    "v5": 95 << 30,
    "v6e": 32 << 30,
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:4x4", "TPU topology, e.g. v5e:4x4, v4:2x2x1.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice over DCN).")
_MAX_SHAPES = flags.DEFINE_integer(
    "max_shapes",
    0,
    "Compile only the first N bucket shapes "
    "(0: all; each B/14 shape takes minutes on a small CPU).",
)
flags.DEFINE_alias("num-slices", "num_slices")
flags.mark_flag_as_required("config")


def compile_for_topology(cfg, topology: str, num_slices: int = 1, max_shapes: int = 0) -> dict:
    from jax.experimental import topologies

    from mmv_jax.batch import spec
    from mmv_jax.data import pipeline
    from mmv_jax.train import sharding as shd
    from mmv_jax.train.loop import build_step
    from mmv_jax.train.metrics import device_bytes

    topo = topologies.get_topology_desc(
        topology_name=topology, platform="tpu", num_slices=num_slices
    )
    devices = list(topo.devices)
    num_hosts = len({d.process_index for d in devices})
    cfg = cfg.copy_and_resolve_references()
    mesh = shd.make_mesh(cfg.mesh.shape, devices)
    step, state, _, batch_sh = build_step(cfg, mesh, abstract=True, process_count=num_hosts)
    kind = devices[0].device_kind
    hbm = next(
        (
            b
            for k, b in sorted(HBM_BYTES.items(), key=lambda kv: -len(kv[0]))
            if k in topology.split(":")[0].lower()
        ),
        0,
    )
    results = []
    shapes = pipeline.bucket_shapes(cfg.data, num_hosts)
    for shape in shapes[:max_shapes] if max_shapes > 0 else shapes:
        batch = tuple(
            spec(rows * num_hosts, seq, slots, pdim, cfg.data.patch_dtype, batch_sh)
            for rows, seq, slots, pdim in shape
        )
        g = sum(b.segment_ids.shape[0] for b in batch)
        seq = shape[0][1]
        t = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        total = device_bytes(compiled)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        results.append(
            {
                "rows": g,
                "seq_len": seq,
                "bytes_per_device": total,
                "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
                "flops": flops,
                "compile_s": round(compile_s, 1),
            }
        )
        print(
            f"[{kind} {topology} x{num_slices}] rows={g} seq={seq}: "
            f"{total / 2**30:.2f} GiB/device (HBM {hbm / 2**30:.0f} GiB), {flops / 1e12:.1f} TFLOP/device, "
            f"compiled in {compile_s:.0f} s",
            file=sys.stderr,
        )
    worst = max(r["bytes_per_device"] for r in results)
    return {
        "topology": topology,
        "num_slices": num_slices,
        "devices": len(devices),
        "hosts": num_hosts,
        "mesh": dict(mesh.shape),
        "device_kind": kind,
        "fits": bool(hbm and worst <= hbm),
        "bytes_per_device": worst,
        "hbm_bytes": hbm,
        "flops": max(r["flops"] for r in results),
        "compiled_shapes": results,
    }


def _main(argv):
    del argv
    print(
        json.dumps(
            compile_for_topology(_CONFIG.value, _TOPOLOGY.value, _SLICES.value, _MAX_SHAPES.value)
        )
    )


if __name__ == "__main__":
    app.run(_main)
