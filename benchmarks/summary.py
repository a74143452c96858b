#!/usr/bin/env python
"""One table across detector families, built from committed ``<stem>_runs.json`` files.

Each argument is ``LABEL=PATH`` (a family's runs file written by ``run_benchmark.py``), or
``LABEL=PATH+PATH...`` to pool several runs files of one teacher into one row (the same teacher
test AP, as ``run_benchmark.py --merge`` requires, and the same CPU kernel set; a (variant, seed)
found in two files must be the same run, and one variant's seeds must share their overrides).
Per family: the teacher's test AP, each variant's test AP as mean ± sample std over its seeds
(with the seed count where it differs from the student alone's), and TID minus the student alone
paired by seed. Nothing is trained or evaluated; the numbers are the files' own.

    python benchmarks/summary.py RetinaNet=benchmarks/results/retinanet_runs.json \
        FCOS=benchmarks/results/fcos_runs.json "Faster R-CNN=benchmarks/results/rcnn_t6426_runs.json"
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run_benchmark import (  # noqa: E402  (this script's own folder)
    EXTRA_VARIANTS,
    MODES,
    VARIANTS,
    paired_with_alone,
    same_teacher,
)
from tid_d2.runs import fmt_mean_std, format_table, mean_std  # noqa: E402

HEADER = {"none": "student alone", "tid": "TID"}


def _columns(families: Sequence[Tuple[str, Dict]]) -> List[str]:
    """Every TID.MODE (a dash where a family has none), and a variant of EXTRA_VARIANTS only when
    some family has it, in the benchmark's table order."""
    present = {r["mode"] for _, data in families for r in data["runs"]}
    return [v for v in VARIANTS if v in MODES or (v in EXTRA_VARIANTS and v in present)]


def family_row(label: str, data: Dict, columns: Sequence[str] = MODES) -> Dict[str, str]:
    """One table row from a runs file's contents (``{"teacher_AP", "runs": [records]}``)."""
    runs = data["runs"]
    by_mode: Dict[str, Dict[int, float]] = {}
    for r in runs:
        by_mode.setdefault(r["mode"], {})[r["seed"]] = r["AP"]
    base = by_mode.get("none", {})
    row = {"family": label, "teacher": f"{data['teacher_AP']:.2f}"}
    for mode in columns:
        aps = by_mode.get(mode)
        if not aps:
            row[HEADER.get(mode, mode)] = "-"
            continue
        cell = fmt_mean_std(*mean_std(aps.values()))
        if len(aps) != len(base):
            cell += f" ({len(aps)} seed{'s' if len(aps) != 1 else ''})"
        row[HEADER.get(mode, mode)] = cell
    paired = [ap - alone for ap, alone in paired_with_alone(runs, "tid")]
    row["TID - alone"] = fmt_mean_std(*mean_std(paired), signed=True) if paired else "-"
    return row


def summary_table(families: Sequence[Tuple[str, Dict]]) -> str:
    """Markdown table, one row per (label, runs-file contents)."""
    columns = _columns(families)
    rows: List[Dict[str, str]] = [family_row(label, data, columns) for label, data in families]
    cols = ["family", "teacher", *(HEADER.get(m, m) for m in columns), "TID - alone"]
    return format_table(rows, cols)


def pooled(datas: Sequence[Dict], names: Sequence[str]) -> Dict:
    """The records of several runs files of one teacher as one runs file's contents.

    Raises ValueError when the files' teachers or CPU kernel sets differ, when a (variant, seed)
    is in two files with different results, or when one variant's seeds were trained with
    different overrides (records without ``opts`` predate it and match any)."""
    first = datas[0]
    cap = (first.get("machine") or {}).get("cpu_capability")
    runs: Dict[Tuple[str, int], Dict] = {}
    opts_of: Dict[str, Tuple[str, list]] = {}
    for data, name in zip(datas, names):
        if not same_teacher(data["teacher_AP"], first["teacher_AP"]):
            raise ValueError(
                f"{name}: teacher test AP {data['teacher_AP']} is not {names[0]}'s "
                f"{first['teacher_AP']}: runs of different teachers do not pool into one row"
            )
        if (data.get("machine") or {}).get("cpu_capability") != cap:
            raise ValueError(f"{name}: trained on another CPU kernel set than {names[0]}")
        for r in data["runs"]:
            key = (r["mode"], r["seed"])
            if key in runs and runs[key]["AP"] != r["AP"]:
                raise ValueError(
                    f"{name}: {r['mode']} seed {r['seed']} is a different run from the one in an "
                    "earlier file (its AP differs): pass only one of the two"
                )
            opts = r.get("opts")
            if opts is not None:
                seen = opts_of.setdefault(r["mode"], (name, list(opts)))
                if seen[1] != list(opts):
                    raise ValueError(
                        f"{name}: {r['mode']} seed {r['seed']} was trained with {list(opts)}, "
                        f"{seen[0]}'s with {seen[1]}: one row holds one setting per variant"
                    )
            runs.setdefault(key, r)
    return {**first, "runs": list(runs.values())}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("families", nargs="+", metavar="LABEL=RUNS_JSON")
    args = p.parse_args(argv)
    families = []
    for item in args.families:
        label, sep, paths = item.partition("=")
        if not sep or not label or not paths:
            p.error(f"{item!r}: expected LABEL=PATH, e.g. FCOS=benchmarks/results/fcos_runs.json")
        names, datas = paths.split("+"), []
        for path in names:
            try:
                with open(path) as f:
                    datas.append(json.load(f))
            except (OSError, ValueError) as e:
                p.error(f"{path}: {e}")
        try:
            families.append((label, pooled(datas, names)))
        except ValueError as e:
            p.error(str(e))
    text = summary_table(families)
    print(text)
    return text


if __name__ == "__main__":
    main()
