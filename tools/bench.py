"""Benchmarks (not tests): ``python tools/bench.py {encoder,data,train,kernels,torch} [args]``.

Each prints one JSON object on stdout. Speed and memory targets are checked here, never in tests.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from mmv_jax.hugepages import reexec_with_hugepages

SUITES = ("encoder", "data", "train", "kernels", "torch")


def main(argv=None):
    if argv is None:
        reexec_with_hugepages()  # as the entry points do (the timings depend on it: see the module)
        argv = sys.argv[1:]
    if not argv or argv[0] not in SUITES:
        sys.exit(f"usage: bench.py {{{','.join(SUITES)}}} [args]")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(f"bench_{argv[0]}")
    result = module.run(argv[1:])
    result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
