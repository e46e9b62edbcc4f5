"""``mmv-manifest``: validate a manifest and count what is in it.

    mmv-manifest validate M.jsonl            one line: records, findings; exit 2 on a bad manifest
    mmv-manifest stats M.jsonl [--json]      records and patients per dataset/split, and per
                                             finding the positive/negative/uncertain/unknown labels

Counts only: no id, path or patient is printed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict

from mmv_jax import cli
from mmv_jax.data.manifest import ManifestError, load_manifest

LABEL_VALUES = {1: "pos", 0: "neg", -1: "uncertain"}


def stats(records) -> dict:
    """Counts of a :func:`load_manifest` result: ``records``, ``findings``, ``splits``
    (records per split), ``patients`` (per split), ``patients_in_several_splits`` and
    ``groups``: ``{"<dataset>/<split>": {"records", "cxr", "ct", "labels": {finding: {"pos",
    "neg", "uncertain", "unknown"}}}}``."""
    findings = records.findings
    groups: dict = {}
    splits_of = defaultdict(set)
    for r in records:
        g = groups.setdefault(
            f"{r.dataset}/{r.split}",
            {
                "records": 0,
                "cxr": 0,
                "ct": 0,
                "labels": {
                    f: dict.fromkeys((*LABEL_VALUES.values(), "unknown"), 0) for f in findings
                },
            },
        )
        g["records"] += 1
        g[r.modality] += 1
        for f in findings:
            g["labels"][f][LABEL_VALUES.get(r.labels.get(f), "unknown")] += 1
        if r.patient:
            splits_of[(r.dataset, r.patient)].add(r.split)
    patients = Counter(s for sp in splits_of.values() for s in sp)
    return {
        "records": len(records),
        "findings": list(findings),
        "splits": dict(Counter(r.split for r in records)),
        "patients": dict(patients),
        "patients_in_several_splits": sum(len(s) > 1 for s in splits_of.values()),
        "groups": dict(sorted(groups.items())),
    }


def stats_table(s: dict) -> str:
    """The counts as a Markdown table: one row per dataset/split, ``pos/neg/unc/unknown`` per finding."""
    head = ["dataset/split", "records", "cxr", "ct", *s["findings"]]
    lines = [
        f"{s['records']} records; findings: {', '.join(s['findings'])}; labels as "
        "pos/neg/uncertain/unknown",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for name, g in s["groups"].items():
        cells = [
            "/".join(str(g["labels"][f][k]) for k in ("pos", "neg", "uncertain", "unknown"))
            for f in s["findings"]
        ]
        lines.append(
            f"| {name} | {g['records']} | {g['cxr']} | {g['ct']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="mmv-manifest", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "check every record; one line"),
        ("stats", "counts per dataset/split/finding"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("manifest")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print the counts as JSON")
    a = ap.parse_args(argv)
    try:
        records = load_manifest(a.manifest)
    except ManifestError as e:
        return cli.fail("mmv-manifest", e)
    if a.command == "validate":
        print(
            f"mmv-manifest: {a.manifest}: {len(records)} records, valid; findings: "
            f"{', '.join(records.findings)}"
        )
    elif a.json:
        print(json.dumps(stats(records)))
    else:
        print(stats_table(stats(records)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
