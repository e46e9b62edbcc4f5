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

from mmv_jax.hugepages import reexec_with_hugepages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    logging.getLogger("mmv_jax").setLevel(logging.INFO)
    from mmv_jax.train.loop import train_and_evaluate

    workdir = os.path.abspath(_WORKDIR.value)
    cfg = _CONFIG.value
    try:
        last = train_and_evaluate(cfg, workdir)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if "config" not in str(e):  # not a user-facing error: keep the traceback
            raise
        sys.exit(f"mmv-train: {e}")
    import jax
    if jax.process_index() == 0:
        print(f"mmv-train: done at loss {last.get('loss', float('nan')):.4f}; "
              f"metrics in {os.path.join(workdir, 'metrics.jsonl')}, "
              f"checkpoints in {os.path.join(workdir, 'checkpoints')}, TensorBoard in {os.path.join(workdir, 'tb')}")


def main():
    reexec_with_hugepages()
    app.run(_main)


if __name__ == "__main__":
    main()
