"""mmv-train: pretrain the SparseMedicalViT encoder with LeJEPA (the one launcher).

Usage:
  mmv-train --config configs/X.py --workdir DIR [--config.a.b=value ...]
  mmv-train --config configs/X.py --print_config [--config.a.b=value ...]   resolved config, exit
  mmv-train --config configs/X.py --dry_run [--config.a.b=value ...]   validate, build, compile
                                                                       one step, exit

Run commands:
  mmv-demo-data --out data/demo && mmv-train --config configs/demo.py --workdir runs/demo
  mmv-train --config configs/stage1_2d.py --workdir gs://bucket/stage1            (TPU pod)
  mmv-train --config configs/stage3_joint.py --workdir runs/s3 \\
      --config.init_from=runs/s2 --config.eval_every_steps=1000

The same command runs on a laptop CPU, on every worker of a TPU VM slice (launch/tpu_pod.sh) and
on every task of a SLURM GPU job (launch/slurm_gpu.sbatch); mmv_jax.train.distributed finds
which. Resumes from DIR when a checkpoint is there; a finished run says so. Every config field
is a flag (--config.optim.lr=3e-4); configs/base.py lists them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from mmv_jax import errors, paths
from mmv_jax.hugepages import reexec_with_hugepages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard."
)
_PRINT = flags.DEFINE_bool("print_config", False, "Print the resolved config (JSON) and exit.")
_DRY = flags.DEFINE_bool(
    "dry_run",
    False,
    "Validate the config, build the model and data "
    "pipeline, compile one train step, print its memory, exit. Writes nothing.",
)
flags.mark_flag_as_required("config")


def check_config(cfg) -> None:
    """Every check that needs no device or file write; raises ``ConfigError`` naming the key."""
    from mmv_jax.train import evaluate
    from mmv_jax.train.loop import validate

    validate(cfg)
    evaluate.validate(cfg)


def dry_run(cfg) -> dict:
    """Validates, builds the mesh, the (shape-only) train state and the data pipeline, and
    compiles the train step on the first real batch. Returns a summary; writes nothing."""
    import jax

    from mmv_jax.train import loop, sharding as shd
    from mmv_jax.train.metrics import device_bytes

    check_config(cfg)
    platform = loop.start(cfg)
    mesh = shd.make_mesh(cfg.mesh.shape)
    step, state, _, batch_sh = loop.build_step(cfg, mesh, abstract=True)
    it = loop.train_iterator(cfg)
    try:
        batch, stats = next(it)
    finally:
        it.close()
    compiled = step.lower(state, shd.global_batch(batch, batch_sh)).compile()
    total = device_bytes(compiled)
    return {
        "platform": platform,
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "batch_rows": int(stats["rows"]),
        "seq_len": int(cfg.data.buckets.seq_len),
        "wire_bytes": int(stats["wire_bytes"]),
        "packing_efficiency": round(float(stats["packing_efficiency"]), 3),
        "bytes_per_device": total,
    }


def _finished_line(workdir, last: dict) -> str:
    """The run's last training and eval values from ``metrics.jsonl``."""
    from mmv_jax.train.metrics import read_metrics

    rows = read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
    train = next((r for r in reversed(rows) if "loss" in r), last)
    evals = next((r for r in reversed(rows) if "eval/macro_auroc" in r), None)
    parts = [f"step {train['step']}"] if "step" in train else []
    loss = train.get("loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        parts.append(f"loss {loss:.4f}")
    if evals and evals["eval/macro_auroc"] is not None:
        parts.append(f"eval macro AUROC {evals['eval/macro_auroc']:.4f} (step {evals['step']})")
    return ", ".join(parts)


def _main(argv):
    if len(argv) > 1:
        sys.exit(
            f"mmv-train: unexpected argument(s) {argv[1:]} (flags are --name=value; "
            "see mmv-train --help)"
        )
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    logging.getLogger("mmv_jax").setLevel(logging.INFO)
    cfg = _CONFIG.value
    if _PRINT.value:
        print(json.dumps(json.loads(cfg.to_json_best_effort()), indent=2, sort_keys=True))
        return
    if not (_DRY.value or _WORKDIR.value):
        sys.exit("mmv-train: --workdir is required (the run folder)")
    try:
        if _DRY.value:
            summary = dry_run(cfg)
            print(f"mmv-train: dry run ok: {json.dumps(summary)}")
            return
        check_config(cfg)
        _train(cfg, paths.resolve(_WORKDIR.value))  # a URI stays a URI (gs://...)
    except errors.user_errors() as e:  # anything else is a bug: it keeps its traceback
        sys.exit(f"mmv-train: {e}")


def _train(cfg, workdir):
    import jax

    from mmv_jax.train.loop import train_and_evaluate

    try:
        last = train_and_evaluate(cfg, workdir)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # A collective failed: another process died (its log says why). Exit at once: the
        # orderly shutdown would wait at a barrier for the dead process and then abort.
        print(
            f"mmv-train: process {jax.process_index()} of {jax.process_count()}: a collective "
            f"failed, another process has probably died (see its log); the run resumes from "
            f"its last checkpoint when restarted. {str(e).splitlines()[0][:300]}",
            file=sys.stderr,
            flush=True,
        )
        logging.shutdown()
        os._exit(1)
    if jax.process_index() != 0:
        return
    where = (
        f"metrics in {workdir / 'metrics.jsonl'}, checkpoints in {workdir / 'checkpoints'}, "
        f"TensorBoard in {workdir / 'tb'}"
    )
    if last.get("already_finished"):
        print(
            f"mmv-train: already finished (config.total_steps={cfg.total_steps}): "
            f"{_finished_line(workdir, last)}; raise --config.total_steps to train further; "
            f"{where}"
        )
        return
    how = "preempted, rerun to resume" if last.get("preempted") else "done"
    print(f"mmv-train: {how} at {_finished_line(workdir, last)}; {where}")


def main():
    argv = sys.argv
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        # absl's --help describes the __main__ module, which is the console-script wrapper
        print(__doc__.strip() + "\n\nFlags:\n" + flags.FLAGS.module_help(__name__))
        sys.exit(0)
    reexec_with_hugepages()
    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
