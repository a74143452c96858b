#!/usr/bin/env python
"""Each variant minus the student alone, paired by seed, pooled over several runs files.

A ``run_benchmark.py`` record only merges runs of one cached teacher on one kind of CPU (float
results differ between kernel sets, so a teacher retrained on another kind is another teacher).
A paired difference, though, compares two runs of the *same* record: same teacher, same kind,
same seed and data order. This script takes the pairs from each file on its own and pools them,
so seeds trained on different machine kinds still give one paired mean per variant:

    python benchmarks/paired.py benchmarks/results/gfl_ablations_s0_runs.json \
        benchmarks/results/gfl_ablations_avx2_runs.json --name gfl_ablations_pooled

A run that appears in several files (the same teacher AP, CPU kernel set, variant and seed, as
``--merge`` copies do) counts once. Per variant: the pairs, their mean ± sample std, t = mean /
(std / sqrt(n)), how many pairs are above zero, for test AP and for val AP, and each pair with
the kind it was trained on. Nothing is trained or evaluated.
"""

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run_benchmark import VARIANTS  # noqa: E402  (this script's own folder)
from tid_d2.runs import fmt_mean_std, format_table  # noqa: E402

Pair = Tuple[str, int, float, float]  # (kind, seed, test AP difference, val AP difference)


def kind_of(data: Dict) -> str:
    """The machine kind a runs file was trained on, e.g. "AMD EPYC (AVX2)"."""
    m = data.get("machine") or {}
    cpu = m.get("cpu", "unknown CPU")
    cap = m.get("cpu_capability")
    return f"{cpu} ({cap})" if cap else cpu


def pooled_pairs(files: Sequence[Dict]) -> Dict[str, List[Pair]]:
    """variant -> [(kind, seed, AP - alone, val AP - alone)], each pair taken inside one file
    (the student alone of the same seed in that file), a run found in several files once."""
    seen = set()
    out: Dict[str, List[Pair]] = {}
    for data in files:
        kind = kind_of(data)
        teacher = round(float(data["teacher_AP"]), 4)
        runs = data["runs"]
        alone = {r["seed"]: r for r in runs if r["mode"] == "none"}
        for r in runs:
            if r["mode"] == "none" or r["seed"] not in alone:
                continue
            key = (teacher, kind, r["mode"], r["seed"])
            if key in seen:
                continue
            seen.add(key)
            base = alone[r["seed"]]
            out.setdefault(r["mode"], []).append(
                (kind, r["seed"], r["AP"] - base["AP"], r["val_AP"] - base["val_AP"])
            )
    return out


def describe(diffs: Sequence[float]) -> Dict[str, str]:
    """mean ± std, t and the count above zero of paired differences."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    std = statistics.stdev(diffs) if n > 1 else None
    t = "-" if not std else f"{mean / (std / math.sqrt(n)):+.2f}"
    return {
        "mean ± std": fmt_mean_std(mean, std, signed=True),
        "t": t,
        "above": f"{sum(d > 0 for d in diffs)}/{n}",
    }


def pooled_table(pairs: Dict[str, List[Pair]]) -> str:
    """Markdown: one row per variant (benchmark order), test and val paired differences."""
    rows = []
    for mode in VARIANTS:
        ps = pairs.get(mode)
        if not ps:
            continue
        test, val = describe([p[2] for p in ps]), describe([p[3] for p in ps])
        rows.append(
            {
                "variant": mode,
                "pairs": len(ps),
                "test AP - alone": test["mean ± std"],
                "t (test)": test["t"],
                "above (test)": test["above"],
                "val AP - alone": val["mean ± std"],
                "t (val)": val["t"],
                "above (val)": val["above"],
                "per pair, test / val (kind, seed)": "; ".join(
                    f"{d:+.2f} / {v:+.2f} ({kind}, s{seed})" for kind, seed, d, v in ps
                ),
            }
        )
    cols = [
        "variant",
        "pairs",
        "test AP - alone",
        "t (test)",
        "above (test)",
        "val AP - alone",
        "t (val)",
        "above (val)",
        "per pair, test / val (kind, seed)",
    ]
    return format_table(rows, cols)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", metavar="RUNS_JSON")
    p.add_argument("--name", help="also write benchmarks/results/<name>.md (with this command)")
    p.add_argument("--results", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    files = []
    for path in args.files:
        try:
            with open(path) as f:
                files.append(json.load(f))
        except (OSError, ValueError) as e:
            p.error(f"{path}: {e}")
    families = {r["family"] for data in files for r in data["runs"] if "family" in r}
    if len(families) > 1:
        p.error(f"the files hold runs of several families ({sorted(families)}); pool one family")
    text = pooled_table(pooled_pairs(files))
    print(text)
    if args.name:
        cmd = "python benchmarks/paired.py " + " ".join(args.files) + f" --name {args.name}"
        kinds = ", ".join(sorted({kind_of(d) for d in files}))
        head = (
            f"# Paired differences to the student alone, pooled ({args.name})\n\n"
            f"Command: `{cmd}`\n\nFiles: "
            + ", ".join(f"`{os.path.basename(f)}`" for f in args.files)
            + f"; machine kinds: {kinds}. Each pair is a variant and the student alone of the "
            "same seed inside one file (same teacher, same kind); a run found in several files "
            "counts once.\n\n"
        )
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, f"{args.name}.md"), "w") as f:
            f.write(head + text + "\n")
    return text


if __name__ == "__main__":
    main()
