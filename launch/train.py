"""The one launcher: ``mmv-train --config configs/X.py --workdir DIR [--config.a.b=value ...]``.

The same command runs on a laptop CPU, on every worker of a TPU VM slice (launch/tpu_pod.sh) and
on every task of a SLURM GPU job (launch/slurm_gpu.sbatch); ``mmv_jax.train.distributed`` finds
which. Resumes from DIR when a checkpoint is there.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmv_jax import paths
from mmv_jax.hugepages import reexec_with_hugepages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    logging.getLogger("mmv_jax").setLevel(logging.INFO)
    from mmv_jax.train.checkpoint import CheckpointError
    from mmv_jax.train.loop import train_and_evaluate
    from mmv_jax.train.workdir import WorkdirBusy

    import jax
    workdir = paths.resolve(_WORKDIR.value)  # a URI stays a URI (gs://...)
    cfg = _CONFIG.value
    try:
        last = train_and_evaluate(cfg, workdir)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # A collective failed: another process died (its log says why). Exit at once: the
        # orderly shutdown would wait at a barrier for the dead process and then abort.
        print(f"mmv-train: process {jax.process_index()} of {jax.process_count()}: a collective "
              f"failed, another process has probably died (see its log); the run resumes from "
              f"its last checkpoint when restarted. {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    except (WorkdirBusy, CheckpointError) as e:
        sys.exit(f"mmv-train: {e}")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if "config" not in str(e):  # not a user-facing error: keep the traceback
            raise
        sys.exit(f"mmv-train: {e}")
    if jax.process_index() == 0:
        how = ("already finished" if last.get("already_finished") else
               "preempted, rerun to resume" if last.get("preempted") else "done")
        loss = f" at step {last['step']}, loss {last['loss']:.4f}" if "loss" in last and "step" in last \
            else f" at loss {last['loss']:.4f}" if "loss" in last else ""
        print(f"mmv-train: {how}{loss}; metrics in {workdir / 'metrics.jsonl'}, "
              f"checkpoints in {workdir / 'checkpoints'}, TensorBoard in {workdir / 'tb'}")


def main():
    reexec_with_hugepages()
    app.run(_main)


if __name__ == "__main__":
    main()
