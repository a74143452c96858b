#!/usr/bin/env python
"""Each variant's loss weight chosen on val (issue 29): one seed per (variant, lambda) of a small
grid, trained exactly as the benchmark's seed-0 run of that variant (val every eval period, val
and test at the end) and chosen on ``tid_shapes_val`` only: this script never reads the test
split's numbers; the chosen point's run is then the benchmark's seed-0 run.

Writes ``benchmarks/results/<setting stem>_lambda.{json,md}`` (e.g. ``fcos_plateau_lambda``): the
val AP of every grid point and, for each variant whose grid is complete, the lambda with the best
val AP, which ``run_benchmark.py`` then uses for that variant in the same setting. The lambda is
written under the mode's own key (``TID.LOSS_WEIGHT`` for the SFDM modes, ``TID.PKD.LOSS_WEIGHT``,
``TID.FGD.LOSS_WEIGHT``, see ``tid_d2.modeling.distiller.loss_weight_key``).

    python benchmarks/lambda_grid.py --family fcos --setting plateau --parallel 2 --reuse
    python benchmarks/lambda_grid.py --family fcos --setting plateau --variants pkd --grid 3 10 30
    python benchmarks/lambda_grid.py --family fcos --variants fitnet tid --train-weights 0.003
    python benchmarks/lambda_grid.py --family fcos --setting standard --variants pkd fgd \\
        --grid-for pkd 0.015 0.05 0.15 --grid-for fgd 0.0015 0.005 0.015 \\
        --alone-from benchmarks/results/fcos_amd_none_runs.json
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run_benchmark import (  # noqa: E402
    EXTRA_VARIANTS,
    FAMILIES,
    SETTINGS,
    VAL,
    VARIANTS,
    _variant_run,
    grid_folder,
    grid_root,
    lambda_file,
)

from tid_d2.modeling.distiller import loss_weight_key  # noqa: E402
from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    cached_teacher,
    code_version,
    command_line,
    final_ap,
    format_table,
    machine_info,
    reuse_state,
    threads_per_run,
    train_or_reuse,
)

# default grids per loss-weight key: SFDM's lambda from the shipped 0.001 up; PKD's and FGD's far
# below their published weights, which on the plateau FCOS pair pull 24-38x harder than the
# detection loss (benchmarks/results/fcos_plateau_grad_norms.md: gradient-norm ratio to detection's
# at initialisation and on the trained student alone: PKD at its published weight 35 / 24, FGD 34 /
# 38, TID at 0.003 0.32 / 0.57, fitnet at 0.003 0.10 / 0.16). Each grid spans the same range of
# strength: its second point (PKD 0.1, FGD 0.01) pulls about as hard as TID at 0.003.
GRIDS = {
    "TID.LOSS_WEIGHT": [0.001, 0.003, 0.01, 0.03],
    "TID.PKD.LOSS_WEIGHT": [0.03, 0.1, 0.3, 1.0],
    "TID.FGD.LOSS_WEIGHT": [0.003, 0.01, 0.03, 0.1],
}
DEFAULT_VARIANTS = ["fitnet", "gt_mask", "pkd", "fgd", *EXTRA_VARIANTS, "tid"]


def grid_of(variant, override, per_variant=None):
    """The loss weights tried for ``variant``: its ``--grid-for`` list, else ``--grid``
    (``override``), else the default grid of its mode's loss-weight key."""
    if per_variant and variant in per_variant:
        return list(per_variant[variant])
    mode = EXTRA_VARIANTS.get(variant, (variant, []))[0]
    return list(override) if override else GRIDS[loss_weight_key(mode)]


def variant_grids(grid_for, variants):
    """{variant: [weights]} of the ``--grid-for VARIANT W [W ...]`` lists; a ValueError for a
    variant not in ``variants``, a weight that is not a number, or a list without weights."""
    out = {}
    for variant, *weights in grid_for:
        if variant not in variants:
            raise ValueError(f"--grid-for {variant}: not among --variants ({' '.join(variants)})")
        if not weights:
            raise ValueError(f"--grid-for {variant}: give at least one loss weight")
        try:
            out[variant] = [float(w) for w in weights]
        except ValueError:
            raise ValueError(
                f"--grid-for {variant}: loss weights must be numbers, got {weights}"
            ) from None
    return out


def grid_run(args, variant, weight, teacher):
    """(label, output folder, config file, overrides) of one grid point: exactly the benchmark's
    first-seed run of that variant with that weight (seed 0, val evaluated every eval period, val
    and test at the end), in the grid's folder. Only val is read here; when the point is chosen,
    run_benchmark.py takes this run as its seed-0 run (``benchmark_run``) instead of training it
    again."""
    bench = SimpleNamespace(
        setting=args.setting,
        iters=args.iters,
        eval_period=SETTINGS[args.setting]["eval_period"],
        seeds=[0],
        workers=args.workers,
        config_dir=args.config_dir,
        loss_weights={variant: weight},
    )
    _, config, opts = _variant_run(bench, args.family, variant, 0, teacher, args.output, [])
    out = grid_folder(args.output, args.family, variant, weight)
    return f"{variant} {weight:g}", out, config, opts


def val_only_opts(opts):
    """The overrides grid points had before they doubled as the benchmark's seed-0 runs (val
    only, evaluated at the end only): such a finished point still counts for the choice on val,
    but the benchmark trains its seed-0 run itself."""
    out = list(opts)
    for key, value in (("DATASETS.TEST", f"('{VAL}',)"), ("TEST.EVAL_PERIOD", "0")):
        out[out.index(key) + 1] = value
    return out


def finished_point(run, iters):
    """The overrides of the finished run in a grid point's folder (``run``: ``grid_run``'s
    tuple), in this format or the earlier val-only one; None when the point is not finished."""
    _, out, config, opts = run
    for candidate in (opts, val_only_opts(opts)):
        try:
            if reuse_state(out, config, candidate, VAL, iters=iters) == "finished":
                return candidate
        except RuntimeError:
            continue
    return None


def student_alone_val_ap(run_dir, record=None, family=None, iters=None):
    """Val AP of the student alone at seed 0: from its run folder ``run_dir`` when it finished
    there, else from ``record`` (a ``run_benchmark.py`` ``*_runs.json``, whose (none, seed 0)
    entry must be of ``family`` and ``iters`` iterations), else None; with where it came from
    (``run_dir`` relative to the repository, or the record's file name). The grid's points are
    compared with it in the report; it takes no part in the choice."""
    try:
        return final_ap(run_dir, VAL)["AP"], os.path.relpath(run_dir, REPO_ROOT)
    except RuntimeError:
        pass
    if record is None:
        return None, None
    with open(record) as f:
        runs = json.load(f)["runs"]
    for r in runs:
        if r["mode"] == "none" and r["seed"] == 0:
            if r["family"] != family or r["iterations"] != iters:
                raise ValueError(
                    f"--alone-from {record}: its student alone is a {r['family']} run of "
                    f"{r['iterations']} iterations, the grid's is {family} at {iters}"
                )
            return r["val_AP"], os.path.basename(record)
    raise ValueError(f"--alone-from {record}: no run of the student alone (none) at seed 0")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="fcos", choices=FAMILIES)
    p.add_argument("--setting", default="plateau", choices=sorted(SETTINGS))
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=VARIANTS)
    p.add_argument("--grid", nargs="*", type=float, default=None, help="override every grid")
    p.add_argument(
        "--grid-for",
        nargs="+",
        action="append",
        default=[],
        metavar=("VARIANT", "WEIGHT"),
        help="override one variant's grid (repeatable), e.g. --grid-for pkd 0.015 0.05 0.15 "
        "--grid-for fgd 0.0015 0.005 0.015: methods whose weights differ by 10x share one run",
    )
    p.add_argument(
        "--train-weights",
        nargs="*",
        type=float,
        default=None,
        help="train only the points of each grid with these weights now (the report and the "
        "choice still cover the whole grid)",
    )
    p.add_argument("--iters", type=int, default=None, help="default: the setting's schedule")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="reuse finished runs, resume stopped ones")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: report the finished points"
    )
    p.add_argument("--output", default=None, help="default: output/<setting folder>_grid")
    p.add_argument("--bench-output", default=None, help="default: output/<setting folder>")
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--config-dir", default=os.path.join(REPO_ROOT, "configs", "shapes"))
    p.add_argument(
        "--alone-from",
        default=None,
        metavar="RUNS_JSON",
        help="read the student alone's seed-0 val AP (the report's reference) from this "
        "run_benchmark.py record when its run folder is not in --bench-output, e.g. one trained "
        "on another machine of the same kind",
    )
    args = p.parse_args(argv)
    setting = SETTINGS[args.setting]
    args.iters = args.iters or setting["iters"]
    bench_output = args.bench_output or os.path.join(REPO_ROOT, "output", setting["output"])
    args.output = args.output or grid_root(bench_output)
    if "none" in args.variants:
        p.error("the student alone has no loss weight to choose")
    try:
        args.grids = variant_grids(args.grid_for, args.variants)
    except ValueError as e:
        p.error(str(e))

    from tid_d2.data import ensure_generated

    for split in ("train", "val", "test"):
        ensure_generated(f"tid_shapes_{split}")
    teacher_dir = os.path.join(bench_output, f"{args.family}_teacher")
    teacher_iters = setting["teacher_iters"] or args.iters
    teacher = cached_teacher(teacher_dir, teacher_iters)
    if teacher is None:
        p.error(
            f"no finished teacher in {teacher_dir}: train it first with `python "
            f"benchmarks/run_benchmark.py --family {args.family} --setting {args.setting} "
            "--modes none --seeds 0` (which also trains the student alone at seed 0)"
        )
    start = time.time()
    points = [(v, w) for v in args.variants for w in grid_of(v, args.grid, args.grids)]
    runs = {pt: grid_run(args, *pt, teacher) for pt in points}

    def train(pt):
        label, out, config, opts = runs[pt]
        threads = threads_per_run(args.parallel)
        quiet = args.parallel > 1
        if args.reuse and finished_point(runs[pt], args.iters) is not None:
            return
        train_or_reuse(config, out, opts, VAL, args.iters, args.reuse, label, quiet, threads)

    if not args.report_only:
        now = [pt for pt in points if args.train_weights is None or pt[1] in args.train_weights]
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(train, now))
    val = {}
    for pt in points:
        if finished_point(runs[pt], args.iters) is not None:
            val[pt] = final_ap(runs[pt][1], VAL)["AP"]
    try:
        alone_ap, alone_source = student_alone_val_ap(
            os.path.join(bench_output, f"{args.family}_none_s0"),
            args.alone_from,
            args.family,
            args.iters,
        )
    except ValueError as e:
        p.error(str(e))

    rows, chosen, grid = [], {}, {}
    for variant in args.variants:
        weights = grid_of(variant, args.grid, args.grids)
        got = {w: val[(variant, w)] for w in weights if (variant, w) in val}
        grid[variant] = {f"{w:g}": ap for w, ap in got.items()}
        complete = len(got) == len(weights)
        best = max(got, key=got.get) if got else None
        if complete:
            chosen[variant] = best
        row = {
            "variant": variant,
            "key": loss_weight_key(EXTRA_VARIANTS.get(variant, (variant,))[0]),
        }
        for w in weights:
            row[f"{w:g}"] = f"{got[w]:.2f}" if w in got else "..."
        row["chosen"] = f"{best:g}" if complete else "(grid unfinished)"
        rows.append(row)
    columns = [
        "variant",
        "key",
        *sorted({c for r in rows for c in r} - {"variant", "key", "chosen"}, key=float),
        "chosen",
    ]
    text = (
        f"### {args.family}, {args.setting} setting: val AP (seed 0) per loss weight\n\n"
        + format_table(rows, columns)
        + "\n\nEach weight under the variant's own key; '...' = not trained yet. "
        + (
            f"The student alone (seed 0): val AP {alone_ap:.2f} ({alone_source}). "
            if alone_ap is not None
            else "The student alone: not finished. "
        )
        + "A variant's lambda is chosen once its whole grid is finished; run_benchmark.py uses it.\n"
        + f"\nCommand: `{command_line('benchmarks/lambda_grid.py')}` "
        f"({(time.time() - start) / 60:.0f} min).\n"
    )
    path = lambda_file(args.results, args.family, args.setting)
    os.makedirs(args.results, exist_ok=True)
    previous = {}
    if os.path.isfile(path):  # keep choices of variants this invocation did not look at
        with open(path) as f:
            previous = json.load(f)
    data = {
        "family": args.family,
        "setting": args.setting,
        "iterations": args.iters,
        "grid": {**previous.get("grid", {}), **grid},
        "chosen": {
            **{k: v for k, v in previous.get("chosen", {}).items() if k not in args.variants},
            **chosen,
        },
        "student_alone_val_AP": alone_ap,
        "student_alone_from": alone_source,
        "machine": machine_info(),
        "code": code_version(),
        "command": command_line("benchmarks/lambda_grid.py"),
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
