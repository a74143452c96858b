#!/usr/bin/env python
"""Where a distillation run's imitation goes, per FPN level, read from its training log.

For each run folder, the mean over each ``--window`` of iterations of every logged per-level
imitation loss (``loss_tid_<level>``, lambda included, as the distiller logs it) and of the
detection losses, from the run's ``metrics.json``; with each level's share of the imitation loss
and the imitation loss's size relative to the detection loss. A mask that puts all its weight on
a few levels, or an imitation that the student has already satisfied, shows here without
running anything.

    python benchmarks/loss_shares.py output/bench_plateau_grid/fcos_tid_l0.003 \\
        output/bench_plateau_grid/fcos_fitnet_l0.003 --window 0 500 --window 5000 6000 \\
        --name fcos_plateau_loss_shares
writes benchmarks/results/<name>.md / .json.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    command_line,
    format_table,
    read_metrics,
    repo_relative,
    write_results,
)

IMITATION_PREFIX = "loss_tid_"


def window_means(records, lo, hi):
    """{loss name: mean} over the training records with ``lo <= iteration < hi`` (evaluation
    records, which carry no losses, are skipped); {} when the window holds no training record."""
    rows = [r for r in records if lo <= r.get("iteration", -1) < hi]
    rows = [r for r in rows if any(k.startswith("loss_") for k in r)]
    if not rows:
        return {}
    keys = sorted({k for r in rows for k in r if k.startswith("loss_")})
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}


def shares(means):
    """(per-level imitation losses {level: value}, their sum, the detection losses' sum, each
    level's share of the imitation {level: fraction}) of one window's ``means``."""
    levels = {
        k[len(IMITATION_PREFIX) :]: v for k, v in means.items() if k.startswith(IMITATION_PREFIX)
    }
    imitation = sum(levels.values())
    detection = sum(v for k, v in means.items() if not k.startswith(IMITATION_PREFIX))
    share = {lv: (v / imitation if imitation > 0 else 0.0) for lv, v in levels.items()}
    return levels, imitation, detection, share


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run folders holding metrics.json")
    p.add_argument(
        "--window",
        nargs=2,
        type=int,
        action="append",
        metavar=("FROM", "TO"),
        help="iteration window [FROM, TO) (repeatable; default: 0 500 and the last 1000)",
    )
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="loss_shares", help="file stem of the results")
    args = p.parse_args(argv)

    rows, data = [], {}
    level_names = []
    for run in args.runs:
        records = read_metrics(run)
        if not records:
            p.error(f"{run}: no metrics.json (is it a training run's output folder?)")
        last = max(r.get("iteration", 0) for r in records) + 1
        windows = args.window or [(0, 500), (max(0, last - 1000), last)]
        name = repo_relative(run)
        data[name] = []
        for lo, hi in windows:
            means = window_means(records, lo, hi)
            if not means:
                continue
            levels, imitation, detection, share = shares(means)
            if not levels:
                p.error(
                    f"{run}: no {IMITATION_PREFIX}<level> losses logged (not a distillation run)"
                )
            level_names += [lv for lv in levels if lv not in level_names]
            row = {
                "run": name,
                "iterations": f"{lo}-{hi}",
                "imitation": imitation,
                "detection": detection,
                "imitation / detection": imitation / detection if detection > 0 else float("nan"),
            }
            row.update({f"{lv} share": share[lv] for lv in levels})
            rows.append(row)
            data[name].append(
                {
                    "from": lo,
                    "to": hi,
                    "means": means,
                    "imitation": imitation,
                    "detection": detection,
                    "share": share,
                }
            )
    columns = ["run", "iterations", "imitation", "detection", "imitation / detection"]
    columns += [f"{lv} share" for lv in level_names]
    md = (
        "Per-level imitation loss (lambda included) and detection loss, mean over each window of "
        "logged training iterations; `share`: the level's fraction of the imitation loss.\n\n"
        + format_table(rows, columns, floatfmt="{:.4f}")
        + f"\n\nCommand: `{command_line('benchmarks/loss_shares.py')}`\n"
    )
    write_results(args.results, args.name, md, {"runs": data})


if __name__ == "__main__":
    main()
