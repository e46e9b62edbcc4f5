"""Benchmarks (not tests): ``python tools/bench.py {encoder,data,train,kernels,torch} [args]``.

Each prints one JSON object on stdout. Speed and memory targets are checked here, never in tests.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

SUITES = ("encoder", "data", "train", "kernels", "torch")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUITES:
        sys.exit(f"usage: bench.py {{{','.join(SUITES)}}} [args]")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(f"bench_{argv[0]}")
    print(json.dumps(module.run(argv[1:]), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
