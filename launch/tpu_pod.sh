#!/usr/bin/env bash
# Run the same mmv-train command on every worker of a TPU VM slice.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.a.b=v ...]
# The repo must be at the same path on every worker (e.g. cloned by a startup script); WORKDIR
# should be shared storage (gs://... or a mounted filesystem). jax.distributed discovers the
# slice from the TPU metadata; each worker feeds its own shard of the data.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.a.b=v ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${MMV_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
# `make venv-tpu` installs the `tpu` extra (libtpu) on every worker; require_platform=tpu makes
# a worker whose TPU runtime did not load fail at once instead of training on its CPU.
cmd="cd $repo && make venv-tpu >/dev/null && .venv/bin/python -m launch.train --config $config --workdir $workdir --config.require_platform=tpu $*"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$cmd"
