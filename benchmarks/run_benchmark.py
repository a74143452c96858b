#!/usr/bin/env python
"""Benchmark: TID against the student alone and the other feature-imitation schemes, in one run.

For one detector family, every variant is trained by the same command (train_net.py on the
family's TID config, only TID.MODE and SEED differ), on the same data and schedule, against one
cached teacher, then evaluated with COCOEvaluator on tid_shapes_val (during and after training)
and tid_shapes_test (after training). Results are written under benchmarks/results/:

- ``<family>_runs.json``: one record per (variant, seed): AP fields on test and val,
  iterations, wall_s, and the variant's sec_per_iter and peak_mem_mb from ``<family>_cost.json``
  when cost.py has written it (null otherwise);
- ``<family>.md``: mean +- std over seeds, gap recovered, cost table;
- ``<family>_ap.png``: test AP per variant with the seed spread; ``<family>_val_curve.png``.

``--name STEM`` writes ``STEM_runs.json``, ``STEM.md`` and ``STEM_*.png`` instead (a run with
overrides keeps the family's committed tables). ``--merge OTHER_runs.json`` adds the records of an
earlier invocation (same family, schedule and teacher) for the (variant, seed) pairs this one did
not run, so a table can gather runs trained in separate sessions; the .md names each merged
file's command. ``--report-only`` trains nothing and writes the tables from the runs that are
finished in ``--output``, listing the requested ones that are not, so a benchmark stopped
part-way (or still running in another process) reports what it has.

Cost (sec/iter, peak memory) is measured separately on identical batches by
``benchmarks/cost.py``; the scaling of significance + loss with GT count and image size by
``benchmarks/scaling.py``.

    python benchmarks/run_benchmark.py --family retinanet --seeds 0 1 2 --iters 1000
    python benchmarks/run_benchmark.py --quick     # every variant for a few iterations (CI)
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.modeling.distiller import loss_weight_key  # noqa: E402
from tid_d2.runs import (  # noqa: E402
    AP_FIELDS,
    BENCHMARK_FAMILIES as FAMILIES,
    BENCHMARK_MODES as MODES,
    REPO_ROOT,
    ap_curve,
    cached_teacher,
    code_version,
    command_line,
    final_ap,
    fmt_mean_std,
    format_table,
    machine_info,
    mark_teacher,
    mean_std,
    repo_relative,
    reuse_state,
    threads_per_run,
    train_net,
    train_or_reuse,
)  # noqa: E402

VAL, TEST = "tid_shapes_val", "tid_shapes_test"

# --setting: which configs, schedules and folders a benchmark uses. "standard": the 1000-iteration
# setting of every table so far (from-scratch ResNet-18 student); "plateau": ImageNet-initialised
# MobileNetV2-FPN32 1-conv students trained 6000 iterations, the schedule and split chosen on val
# (benchmarks/plateau_curve.py), a MobileNetV2-FPN128 4-conv teacher trained 4000
# (configs/shapes/*_plateau.yaml: FCOS, RetinaNet, GFL, ATSS; none for Faster R-CNN).
SETTINGS = {
    "standard": dict(
        config="tid_{fam}.yaml",
        teacher_config="{fam}_mnv2_teacher.yaml",
        iters=1000,
        teacher_iters=None,
        eval_period=250,
        output="bench",
        stem="{fam}",
    ),
    "plateau": dict(
        config="tid_{fam}_plateau.yaml",
        teacher_config="{fam}_mnv2_teacher_plateau.yaml",
        iters=6000,
        teacher_iters=4000,
        eval_period=500,
        output="bench_plateau",
        stem="{fam}_plateau",
    ),
}


# The variants of a table: every TID.MODE (tid_d2.runs.BENCHMARK_MODES) and TID with one option
# changed (issue 29), name -> (TID.MODE, overrides); table order: the student alone first, TID last.
EXTRA_VARIANTS = {
    "tid_locations": ("tid", ["TID.REGION.NORMALIZE", "locations"]),
    "tid_channel_norm": ("tid", ["TID.FEATURE_NORM", "channel"]),
    # adapters at 333 x BASE_LR = 1 / lambda at the plateau lambda 0.003: at that lambda the
    # adapters otherwise stay within 3-7 % of their random start (benchmarks/head_swap.py)
    "tid_adapter_lr333": ("tid", ["TID.ADAPTER_LR_SCALE", "333.0"]),
}
VARIANTS = [*MODES[:-1], *EXTRA_VARIANTS, MODES[-1]]
# the variants a benchmark runs unless --modes says otherwise (the TID.MODE values)
DEFAULT_VARIANTS = list(MODES)


def families_of_setting(config_dir, setting):
    """The families with both of ``setting``'s configs (student and teacher) in ``config_dir``."""
    keys = ("config", "teacher_config")
    return [
        fam
        for fam in FAMILIES
        if all(
            os.path.isfile(os.path.join(config_dir, SETTINGS[setting][k].format(fam=fam)))
            for k in keys
        )
    ]


def variant_opts(variant, loss_weights=None):
    """train_net.py overrides of a variant: its TID.MODE, its own options and, when
    ``loss_weights`` ({variant: lambda}, chosen on val by benchmarks/lambda_grid.py) has it, its
    loss weight under the mode's key."""
    mode, opts = EXTRA_VARIANTS.get(variant, (variant, []))
    out = ["TID.MODE", mode, *opts]
    if loss_weights and variant in loss_weights:
        out += [loss_weight_key(mode), str(loss_weights[variant])]
    return out


def lambda_file(results_dir, fam, setting):
    """Where benchmarks/lambda_grid.py writes the val-chosen loss weights of a setting."""
    return os.path.join(results_dir, f"{SETTINGS[setting]['stem'].format(fam=fam)}_lambda.json")


def chosen_loss_weights(path):
    """{variant: lambda} chosen on val (``lambda_file``), {} when there is no such file."""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {k: float(v) for k, v in json.load(f)["chosen"].items()}


def split_name(args, fam):
    """The name of ``--student-config`` (another split of the setting): its file stem without the
    setting's config stem, e.g. ``fpn16`` for ``tid_retinanet_plateau_fpn16.yaml``; None for the
    setting's own student config."""
    path = getattr(args, "student_config", None)
    if not path:
        return None
    stem = os.path.splitext(os.path.basename(path))[0]
    own = os.path.splitext(SETTINGS[args.setting]["config"].format(fam=fam))[0] + "_"
    return stem[len(own) :] if stem.startswith(own) and len(stem) > len(own) else stem


def check_split_teacher(parser, path, config_dir, setting, fam):
    """``--student-config`` must exist and distil from the setting's teacher config, the one whose
    cached weights the benchmark passes: another teacher's config would load weights of another
    model. Errors through ``parser`` naming both configs."""
    if not os.path.isfile(path):
        parser.error(f"--student-config {path}: no such file")
    from tid_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(path)
    theirs = os.path.abspath(os.path.join(REPO_ROOT, cfg.TID.TEACHER.CONFIG_FILE))
    ours = os.path.abspath(os.path.join(config_dir, setting["teacher_config"].format(fam=fam)))
    if theirs != ours:
        parser.error(
            f"--student-config {path}: its TID.TEACHER.CONFIG_FILE is {cfg.TID.TEACHER.CONFIG_FILE}, "
            f"the setting's cached teacher is {repo_relative(ours)}; a split shares the setting's "
            "teacher (set TID.TEACHER.CONFIG_FILE to it, or use another --setting)"
        )


def _variant_run(args, fam, mode, seed, teacher_weights, out_root, extra):
    """(output folder, config file, train_net.py overrides) of one (variant, seed) run: the
    setting's TID config, or ``--student-config`` (another split) whose runs are named
    ``<family>_<split>_<variant>_s<seed>`` (:func:`split_name`) beside the setting's, against the
    same teacher."""
    split = split_name(args, fam)
    out = os.path.join(
        out_root, f"{fam}_{split}_{mode}_s{seed}" if split else f"{fam}_{mode}_s{seed}"
    )
    opts = [
        "SEED",
        str(seed),
        *variant_opts(mode, getattr(args, "loss_weights", None)),
        "TID.TEACHER.WEIGHTS",
        teacher_weights,
        "SOLVER.MAX_ITER",
        str(args.iters),
        "DATASETS.TEST",
        f"('{VAL}','{TEST}')",
        "TEST.EVAL_PERIOD",
        str(args.eval_period if seed == args.seeds[0] else 0),
        "DATALOADER.NUM_WORKERS",
        str(args.workers),
        "VIS_PERIOD",
        "0",
    ] + extra
    if split:
        return out, os.path.abspath(args.student_config), opts
    config = SETTINGS[args.setting]["config"].format(fam=fam)
    return out, os.path.join(args.config_dir, config), opts


def grid_root(out_root):
    """The folder of benchmarks/lambda_grid.py's runs beside a benchmark's folder ``out_root``."""
    return os.path.normpath(out_root) + "_grid"


def grid_folder(root, fam, variant, weight):
    """The folder of one lambda-grid point (``root``: :func:`grid_root`)."""
    return os.path.join(root, f"{fam}_{variant}_l{weight:g}")


def benchmark_run(args, fam, mode, seed, teacher_weights, out_root, extra):
    """``_variant_run``, except that the first seed's run of a variant whose loss weight was
    chosen on val is the lambda grid's run of that weight when that one is finished with exactly
    these settings (the grid trains seed 0 with the benchmark's own overrides and evaluates val and
    test, choosing on val only), so the chosen point is not trained twice."""
    out, config, opts = _variant_run(args, fam, mode, seed, teacher_weights, out_root, extra)
    weight = (getattr(args, "loss_weights", None) or {}).get(mode)
    if weight is None or seed != args.seeds[0] or extra or split_name(args, fam):
        return out, config, opts
    grid = grid_folder(grid_root(out_root), fam, mode, weight)
    try:
        if reuse_state(grid, config, opts, TEST, iters=args.iters) == "finished":
            return grid, config, opts
    except RuntimeError:  # a grid run of other settings (e.g. an older val-only one)
        pass
    return out, config, opts


def _run_variant(args, fam, mode, seed, teacher_weights, out_root, extra, threads=None):
    out, config, opts = benchmark_run(args, fam, mode, seed, teacher_weights, out_root, extra)
    state, secs = train_or_reuse(
        config,
        out,
        opts,
        TEST,
        args.iters,
        args.reuse,
        label=f"{mode} s{seed}",
        quiet=args.parallel > 1,
        threads=threads,
    )
    record = {"family": fam, "mode": mode, "seed": seed, "iterations": args.iters, "wall_s": secs}
    record["variant_opts"] = variant_opts(mode, getattr(args, "loss_weights", None))
    # the invocation's KEY VALUE overrides (e.g. TID.FGD.LOSS_WEIGHT 0.005): a record merged into
    # another table, or pooled by paired.py, keeps the settings it was trained with
    record["opts"] = list(extra)
    record["resumed"] = state == "resumable"
    # --student-config: the split this record belongs to (None: the setting's own)
    record["student_config"] = repo_relative(config) if split_name(args, fam) else None
    record["lambda_grid_run"] = os.path.dirname(out) == grid_root(out_root)
    record.update({f: v for f, v in final_ap(out, TEST).items()})
    record.update({f"val_{f}": v for f, v in final_ap(out, VAL).items()})
    record["val_curve"] = ap_curve(out, VAL)
    print(
        f"[bench] {fam} {mode:8s} seed {seed}: test AP {record['AP']:.2f}  val AP {record['val_AP']:.2f}",
        flush=True,
    )
    return record


def attach_cost(records, cost_rows):
    """Give each record its variant's ``sec_per_iter`` and ``peak_mem_mb`` as measured by cost.py
    on identical batches (``cost_rows``: {mode: {"sec_per_iter", "peak_mem_mb"}}; a mode it did
    not measure gets None). The runs' own wall time is not a cost measurement: parallel runs
    share the cores and the time includes evaluation."""
    for r in records:
        row = cost_rows.get(r["mode"], {})
        r["sec_per_iter"] = row.get("sec_per_iter")
        r["peak_mem_mb"] = row.get("peak_mem_mb")
    return records


def same_teacher(ap_a, ap_b):
    """Whether two teacher test APs (of runs files, or a file's and this invocation's) name one
    cached teacher. A teacher is deterministic given its config, schedule and CPU kernel set, so
    the same teacher's AP agrees up to the json round trip (1e-6); any larger difference is
    another teacher, whose students' records do not compare. ``--merge`` and ``summary.py``'s
    pooling both decide by this rule. A teacher with no detections (a ``--quick`` one on some
    kernel sets) has AP NaN, which two such teachers share: NaN matches NaN and nothing else."""
    if math.isnan(ap_a) or math.isnan(ap_b):
        return math.isnan(ap_a) and math.isnan(ap_b)
    return abs(ap_a - ap_b) <= 1e-6


def merge_records(records, paths, fam, iters, teacher_ap, modes=None, student_config=None):
    """Add the records of earlier invocations (their ``<stem>_runs.json`` files, ``paths``) for
    every (variant, seed) this invocation did not run, so one table can gather runs trained in
    separate sessions; ``modes`` (None: all) limits which variants are taken from the files, so a
    run with overrides can borrow the student alone without also borrowing, say, a ``fitnet``
    trained at another loss weight. A run is deterministic given its seed and teacher, so a merged
    record stands for the run this invocation would have made, provided it was trained with the
    same family, schedule, teacher and student config: a differing family, iteration count or
    ``--student-config`` (``student_config``, repo-relative; None for the setting's own), or a
    teacher whose test AP differs, is an error. Returns (records sorted by seed then variant, the merged files'
    commands); merged records carry ``merged_from`` (the file's name)."""
    have = {(r["mode"], r["seed"]) for r in records}
    merged, commands = list(records), []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not same_teacher(data["teacher_AP"], teacher_ap):
            where = data.get("machine", {})
            where = f" on {where['cpu']} ({where['cpu_capability']})" if where else ""
            raise ValueError(
                f"--merge {path}: its runs were trained against a teacher with test AP "
                f"{data['teacher_AP']:.4f}{where}, this invocation's teacher has "
                f"{teacher_ap:.4f}; the records are not comparable. Merge only runs of the same "
                "cached teacher (same config, --teacher-iters and overrides, and the same kind of "
                "CPU: float results differ between kernel sets), or retrain them here."
            )
        for r in data["runs"]:
            if r["family"] != fam or r["iterations"] != iters:
                raise ValueError(
                    f"--merge {path}: a {r['family']} run of {r['iterations']} iterations cannot "
                    f"join a {fam} table of {iters} iterations; pass --family/--iters to match"
                )
            if r.get("student_config") != student_config:
                theirs = r.get("student_config") or "the setting's student config"
                ours = student_config or "the setting's student config"
                raise ValueError(
                    f"--merge {path}: its {r['mode']} s{r['seed']} run trained {theirs}, this "
                    f"table is of {ours}: another split's students do not join its table"
                )
            if modes is not None and r["mode"] not in modes:
                continue
            if (r["mode"], r["seed"]) in have:
                continue  # this invocation's run, or an earlier file's, takes precedence
            have.add((r["mode"], r["seed"]))
            merged.append(dict(r, merged_from=os.path.basename(path)))
        commands.append(f"`{os.path.basename(path)}`: `python {data['command']}`")
    merged.sort(key=lambda r: (r["seed"], VARIANTS.index(r["mode"])))
    return merged, commands


def paired_with_alone(records, mode):
    """[(AP of ``mode``, the student alone's AP of the same seed)] for each seed that both have
    in ``records``: the pairs every "minus the student alone" number is computed from."""
    alone = {r["seed"]: r["AP"] for r in records if r["mode"] == "none"}
    return [
        (r["AP"], alone[r["seed"]]) for r in records if r["mode"] == mode and r["seed"] in alone
    ]


def summarize(records, fam, teacher_ap, cost=None, teacher_iters=None):
    """Markdown: per variant, AP fields as mean ± sample std over seeds, the AP difference to the
    student alone paired by seed (mean ± std over the seeds both have), and the share of the
    teacher-student gap recovered, over those same seeds: mean paired difference / (teacher AP -
    the student alone's mean AP on them), so a variant with fewer seeds than the student alone
    is compared on its own seeds (with every seed in both, (mean AP - mean alone) / (teacher -
    mean alone))."""
    rows = []
    for mode in VARIANTS:
        rs = [r for r in records if r["mode"] == mode]
        if not rs:
            continue
        row = {"variant": mode, "seeds": len(rs)}
        for f in AP_FIELDS:
            row[f] = fmt_mean_std(*mean_std([r[f] for r in rs]))
        row["val AP"] = f"{statistics.mean(r['val_AP'] for r in rs):.2f}"
        pairs = paired_with_alone(records, mode)
        paired = [ap - alone for ap, alone in pairs]
        row["AP - none"] = fmt_mean_std(*mean_std(paired), signed=True) if paired else "-"
        row["gap recovered"] = "-"
        if paired and mode != "none":
            gap = teacher_ap - statistics.mean(alone for _, alone in pairs)
            if gap > 0:
                row["gap recovered"] = f"{100 * statistics.mean(paired) / gap:.0f}%"
        rows.append(row)
    cols = ["variant", "seeds", *AP_FIELDS, "val AP", "AP - none", "gap recovered"]
    sched = f" ({teacher_iters} iterations)" if teacher_iters else ""
    text = f"### {fam}: COCO bbox AP on {TEST} (mean ± std over seeds); teacher AP {teacher_ap:.2f}{sched}\n\n"
    text += format_table(rows, cols)
    text += (
        "\n\n`AP - none`: AP minus the student alone's AP of the same seed, mean ± std over "
        "the seeds both have."
    )
    if cost:
        text += "\n\n" + cost
    return text


def plots(records, fam, out_dir, stem=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    modes = [m for m in VARIANTS if any(r["mode"] == m for r in records)]
    for i, mode in enumerate(modes):
        aps = [r["AP"] for r in records if r["mode"] == mode]
        ax.scatter([i] * len(aps), aps, color="gray", s=12, zorder=3)
        ax.errorbar(
            i,
            statistics.mean(aps),
            yerr=statistics.stdev(aps) if len(aps) > 1 else 0,
            fmt="o",
            color="C3" if mode == "tid" else "C0",
            capsize=4,
            zorder=4,
        )
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel(f"AP on {TEST}")
    ax.set_title(f"{fam}: test AP per variant (dots: seeds, bars: mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    ap_png = os.path.join(out_dir, f"{stem or fam}_ap.png")
    fig.savefig(ap_png, dpi=90)
    plt.close(fig)

    if not any(len(r["val_curve"]) > 1 for r in records):
        return ap_png, None  # no periodic evaluation in these runs (--eval-period 0)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for mode in modes:
        for r in records:
            if r["mode"] == mode and len(r["val_curve"]) > 1:
                x, y = zip(*r["val_curve"])
                ax.plot(x, y, "-o", label=mode, lw=2 if mode == "tid" else 1, ms=3)
                break
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"AP on {VAL}")
    ax.set_title(f"{fam}: validation AP during training (first seed)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    curve_png = os.path.join(out_dir, f"{stem or fam}_val_curve.png")
    fig.savefig(curve_png, dpi=90)
    plt.close(fig)
    return ap_png, curve_png


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (also read back by ``paired.py`` from a record's command)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="retinanet", choices=FAMILIES)
    p.add_argument(
        "--modes",
        nargs="*",
        default=DEFAULT_VARIANTS,
        choices=VARIANTS,
        help="variants: the TID.MODE values (default) and " + ", ".join(EXTRA_VARIANTS),
    )
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument(
        "--setting",
        default="standard",
        choices=sorted(SETTINGS),
        help="standard: 1000-iteration from-scratch students (the tables so far); plateau: "
        "ImageNet-initialised students trained to their plateau, a deeper teacher trained longer "
        "(sets the defaults of --iters, --teacher-iters, --eval-period, --output, --name)",
    )
    p.add_argument("--iters", type=int, default=None, help="student schedule (default: setting's)")
    p.add_argument(
        "--student-config",
        default=None,
        help="another split of the setting: this TID config instead of the setting's (its own "
        "student, the setting's teacher config in TID.TEACHER, which this benchmark replaces by "
        "its cached teacher); SPLIT is its file stem less the setting's config stem (fpn16 for "
        "tid_retinanet_plateau_fpn16.yaml): runs <family>_<SPLIT>_<variant>_s<seed> in --output, "
        "default --name <setting's>_<SPLIT>, records that --merge keeps apart from other splits'",
    )
    p.add_argument(
        "--teacher-iters",
        type=int,
        default=None,
        help="teacher schedule (default: the setting's, else --iters); lets longer student "
        "schedules share a teacher",
    )
    p.add_argument(
        "--eval-period",
        type=int,
        default=None,
        help="val evaluation period (first seed; default: the setting's)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at once (each gets cores/parallel threads). Two invocations side by side "
        "must each have --parallel 2 (or more): at --parallel 1 each takes every core and their "
        "threads contend (seen: about 15x slower on 2 cores)",
    )
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per run")
    p.add_argument(
        "--output", default=None, help="run folders (default: output/<setting's folder>)"
    )
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--config-dir", default=os.path.join(REPO_ROOT, "configs", "shapes"))
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished runs in --output and resume stopped ones (same settings only)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="file stem of the results (default: the family, with _quick in --quick mode), e.g. "
        "for a run with overrides that must not replace the family's committed tables",
    )
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="RUNS_JSON",
        help="an earlier invocation's <stem>_runs.json whose (variant, seed) records join this "
        "report where this invocation did not run them (same family, --iters and teacher only); "
        "repeat the flag for several files",
    )
    p.add_argument(
        "--merge-modes",
        nargs="*",
        choices=VARIANTS,
        default=None,
        help="take only these variants from the --merge files (default: all), e.g. 'none' to "
        "compare a run with overrides against the student alone without mixing in variants "
        "that were trained without those overrides",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the tables from the runs of --modes x --seeds that are "
        "finished in --output (as --reuse would read them) plus the --merge records; runs not "
        "finished there are listed and left out, so a benchmark stopped part-way still reports",
    )
    p.add_argument("--quick", action="store_true", help="every variant, 1 seed, a few iterations")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    setting = SETTINGS[args.setting]
    if args.iters is None:
        args.iters = setting["iters"]
    if args.teacher_iters is None:
        args.teacher_iters = setting["teacher_iters"]
    if args.eval_period is None:
        args.eval_period = setting["eval_period"]
    if args.output is None:
        args.output = os.path.join(REPO_ROOT, "output", setting["output"])
    # each variant's loss weight as chosen on val for this setting, where that has been done
    args.loss_weights = chosen_loss_weights(lambda_file(args.results, args.family, args.setting))
    extra = list(args.opts)
    if args.quick:
        args.seeds, args.iters, args.eval_period = args.seeds[:1], 4, 2
        extra += [
            "SOLVER.WARMUP_ITERS",
            "1",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "DATALOADER.NUM_WORKERS",
            "0",
        ]
        args.workers = 0
    fam = args.family
    teacher_iters = args.teacher_iters or args.iters
    if args.student_config:
        check_split_teacher(p, args.student_config, args.config_dir, setting, fam)
    student_config = (
        repo_relative(os.path.abspath(args.student_config)) if args.student_config else None
    )
    for key in ("config", "teacher_config"):
        path = os.path.join(args.config_dir, setting[key].format(fam=fam))
        if not os.path.isfile(path):
            p.error(
                f"--family {fam} --setting {args.setting}: no config {path}; this setting has "
                f"configs for: {', '.join(families_of_setting(args.config_dir, args.setting))}"
            )

    from tid_d2.data import ensure_generated

    for split in ("train", "val", "test"):
        ensure_generated(f"tid_shapes_{split}")
    start = time.time()
    teacher_dir = os.path.join(args.output, f"{fam}_teacher")
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    if args.report_only:
        args.reuse = True
        if cached_teacher(teacher_dir, teacher_iters) is None:
            p.error(f"--report-only: no finished teacher in {teacher_dir}; nothing to report")
    elif cached_teacher(teacher_dir, teacher_iters) is None:
        print(f"[bench] training the {fam} teacher once (cached in {teacher_dir})", flush=True)
        train_net(
            os.path.join(args.config_dir, setting["teacher_config"].format(fam=fam)),
            teacher_dir,
            ["SOLVER.MAX_ITER", str(teacher_iters), "DATASETS.TEST", f"('{VAL}','{TEST}')"] + extra,
            label="teacher",
        )
        mark_teacher(teacher_dir, teacher_iters)
    teacher_ap = final_ap(teacher_dir, TEST)["AP"]
    try:  # fail before training the students, not after
        merge_records([], args.merge, fam, args.iters, teacher_ap, args.merge_modes, student_config)
    except (OSError, ValueError) as e:
        p.error(str(e))

    # the teacher ran alone on every core; parallel students share them
    threads = threads_per_run(args.parallel)
    jobs = [(m, s) for s in args.seeds for m in args.modes]
    unfinished = []  # --report-only: "<mode> s<seed>" of each requested run not finished
    if args.report_only:
        finished_jobs = []
        for mode, seed in jobs:
            run = benchmark_run(args, fam, mode, seed, teacher_weights, args.output, extra)
            if reuse_state(*run, TEST, iters=args.iters) == "finished":
                finished_jobs.append((mode, seed))
            else:
                unfinished.append(f"{mode} s{seed}")
        jobs = finished_jobs
        if unfinished:
            print(f"[bench] --report-only leaves out unfinished runs: {', '.join(unfinished)}")
        if not jobs and not args.merge:
            p.error(f"--report-only: no finished run of --modes x --seeds in {args.output}")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        records = list(
            pool.map(
                lambda j: _run_variant(
                    args, fam, j[0], j[1], teacher_weights, args.output, extra, threads
                ),
                jobs,
            )
        )

    records, merged_commands = merge_records(
        records, args.merge, fam, args.iters, teacher_ap, args.merge_modes, student_config
    )

    os.makedirs(args.results, exist_ok=True)
    stem = args.name or (f"{fam}_quick" if args.quick else setting["stem"].format(fam=fam))
    if split_name(args, fam) and not args.name:
        stem += f"_{split_name(args, fam)}"
    cost_json = os.path.join(args.results, f"{fam}_cost.json")
    cost_rows = {}
    # cost.py measures the standard setting's models; the plateau setting has none measured yet
    measured = not args.quick and args.setting == "standard"
    if os.path.isfile(cost_json) and measured:
        with open(cost_json) as f:
            cost_rows = json.load(f)
    attach_cost(records, cost_rows)
    with open(os.path.join(args.results, f"{stem}_runs.json"), "w") as f:
        json.dump(
            {
                "teacher_AP": teacher_ap,
                "teacher_iterations": teacher_iters,
                "student_config": student_config,
                "command": shlex.join(sys.argv),
                "machine": machine_info(),
                "code": code_version(),
                "runs": records,
            },
            f,
            indent=1,
        )
    cost_md = os.path.join(args.results, f"{fam}_cost.md")
    cost = open(cost_md).read() if os.path.isfile(cost_md) and measured else None
    text = summarize(records, fam, teacher_ap, cost, teacher_iters)
    if args.loss_weights:
        text += (
            "\n\nLoss weights chosen on val (benchmarks/lambda_grid.py, "
            f"`{os.path.basename(lambda_file(args.results, fam, args.setting))}`): "
            + ", ".join(f"{v} {w:g}" for v, w in args.loss_weights.items())
            + "; the other variants keep their config's."
        )
    ran = [r for r in records if "merged_from" not in r]
    reused = sum(r["wall_s"] is None for r in ran)
    resumed = sum(r["resumed"] for r in ran)
    text += (
        f"\n\nCommand: `{command_line('benchmarks/run_benchmark.py')}`; wall time "
        f"{(time.time() - start) / 60:.0f} min ({reused} of {len(ran)} student runs reused "
        f"finished from earlier invocations, {resumed} resumed from a checkpoint).\n"
    )
    if unfinished:
        text += (
            "\nReport only (`--report-only`); requested but not finished in --output, so not "
            f"in the table: {', '.join(unfinished)}.\n"
        )
    if merged_commands:
        text += (
            f"\n{len(records) - len(ran)} of the {len(records)} records were merged (`--merge`) "
            "from runs trained by earlier invocations against the same teacher"
            + (f" (variants taken: {', '.join(args.merge_modes)})" if args.merge_modes else "")
            + ": "
            + "; ".join(merged_commands)
            + ".\n"
        )
    with open(os.path.join(args.results, f"{stem}.md"), "w") as f:
        f.write(text)
    if not args.quick:
        plots(records, fam, args.results, stem)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
