#!/usr/bin/env bash
# Run tools/device_check.py on a lent GPU machine whose image has jax, flax, optax, orbax and
# triton but not the rest of our dependencies. The missing wheels travel in .whl/ (ignored by git):
#   .whl/base/   grain, array-record, portpicker, ml-collections, pydicom, nibabel, tensorboardX
#   .whl/alt/    flax (installed only when the image's flax is older than our lower bound)
#   .whl/jt*/    one jax-triton version per folder; the first whose kernels run here is used
# `bash tools/device_run.sh --fetch` downloads them here (Python 3.12, x86-64 Linux; 11 MB).
# On the device: bash tools/device_run.sh 'CMD' ['CMD' ...], e.g.
#   bash tools/device_run.sh 'timeout 300 python3 tools/device_check.py --section kernels'
# Each CMD runs in turn with that environment; logs go to $OUT (or ./device_logs).
# Seen 2026-11-26 on the H200 image (jax 0.11.2, triton 3.6.0): jax-triton 0.3.1 runs (through
# jaxlib's legacy `triton_kernel_call` target); 0.4.x needs triton >= 3.7, whose wheel (200 MB)
# is too big to carry.
set -u
if [ "${1:-}" = "--fetch" ]; then
  dl() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d ".whl/$1" "${@:2}"
  }
  dl base grain==0.2.18 array-record portpicker ml-collections==1.1.0 pydicom nibabel tensorboardX
  dl alt flax==0.12.8
  dl jt31 jax-triton==0.3.1
  dl jt41 jax-triton==0.4.1
  exit
fi
out=${OUT:-device_logs}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/base/*.whl || exit 3
python3 - <<'EOF' || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/alt/*.whl
import sys, flax
from packaging.version import Version
sys.exit(Version(flax.__version__) < Version("0.12.8"))
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader

smoke='
import jax, jax.numpy as jnp, numpy as np, jax_triton
from mmv_jax.kernels.attention import segment_attention as f
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 64)), jnp.bfloat16) for _ in range(3))
s = jnp.asarray(np.repeat([1, 2], 128)[None], jnp.int32)
loss = lambda q, k, v, impl: f(q, k, v, s, impl=impl).astype(jnp.float32).sum()
got = jax.jit(jax.value_and_grad(lambda q: loss(q, k, v, "triton_gpu")))(q)
want = jax.jit(jax.value_and_grad(lambda q: loss(q, k, v, "xla")))(q)
err = float(jnp.linalg.norm((got[1] - want[1]).astype(jnp.float32)) / jnp.linalg.norm(want[1].astype(jnp.float32)))
print("smoke jax-triton", jax_triton.__version__, "jax", jax.__version__, "dq rel err", err)
assert np.isfinite(err) and err < 3e-2
'
picked=""
for jt in .whl/jt*/; do
  rm -rf /tmp/jt; python3 -m pip install -q --no-index --no-deps --target /tmp/jt "$jt"*.whl
  PYTHONPATH=/tmp/jt:$PYTHONPATH timeout 180 python3 -c "$smoke" >/tmp/smoke.out 2>&1; rc=$?
  cat /tmp/smoke.out >>"$out/smoke.log"; tail -3 /tmp/smoke.out
  if [ $rc = 0 ]; then picked=$jt; break; fi
done
echo "jax-triton from: ${picked:-none (no version ran the kernels; see smoke.log)}"
export PYTHONPATH=/tmp/jt:$PYTHONPATH
status=0; i=0
for cmd in "$@"; do
  i=$((i + 1)); echo "### $cmd"
  bash -c "$cmd" 2>&1 | tee "$out/step$i.log"; rc=${PIPESTATUS[0]}
  echo "### exit $rc"; [ $rc = 0 ] || status=$rc
done
exit $status
