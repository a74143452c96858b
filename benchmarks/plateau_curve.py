#!/usr/bin/env python
"""Choosing the plateau setting's student schedule on val (issue 29's first step).

Trains (or, with ``--reuse``, reads) the student alone, seed 0, of ``--setting plateau`` at the
chosen schedule S (``--iters``) and at 2 S, each evaluated on ``tid_shapes_val`` every
``--eval-period`` iterations, and reads the plateau teacher's val curve from the benchmark's
teacher folder. The S run is exactly the benchmark's ``none`` seed-0 run (same folder, config and
overrides), so ``run_benchmark.py --setting plateau --reuse`` takes it as finished. Writes
``benchmarks/results/<family>_plateau_curve.{md,json,png}`` with both checks of the setting:

- plateau: val AP at S within one seed std of val AP at 2 S (the std of the student alone's seeds
  at S, from ``--seed-std`` or the benchmark's ``<family>_plateau_runs.json`` when it has at least
  two seeds; "pending" otherwise);
- something to distil: the teacher's val AP at least 5 AP above the student's at 2 S.

With ``--teacher`` it trains (or reads) only the teacher at twice its schedule (2 T), evaluated on
val every ``TEST.EVAL_PERIOD`` of the teacher's config, and the report adds the teacher's own
plateau check (val AP at T minus at 2 T) and the lead a longer-trained teacher would have.

    python benchmarks/plateau_curve.py --family fcos --reuse --parallel 2
    python benchmarks/plateau_curve.py --family retinanet --reuse --teacher
"""

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run_benchmark import FAMILIES, SETTINGS, VAL, _variant_run  # noqa: E402

from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    ap_curve,
    code_version,
    command_line,
    format_table,
    machine_info,
    mean_std,
    threads_per_run,
    train_or_reuse,
)

MIN_TEACHER_LEAD = 5.0  # AP: the teacher above the student's plateau, else nothing to distil


def candidate_runs(args):
    """[(label, folder, config, overrides, iterations)] of a candidate student (``--candidate
    NAME KEY VALUE ...``) at S and 2 S: the student alone with the overrides, evaluated on val
    every ``--eval-period``: another split's plateau and the teacher's lead over it."""
    return [_candidate_run(args, args.iters, "S"), _candidate_run(args, 2 * args.iters, "2 S")]


def _candidate_run(args, iters, name):
    setting = SETTINGS["plateau"]
    out = os.path.join(args.output, f"{args.family}_{args.candidate}_none_s0_{iters}")
    opts = ["SEED", "0", "TID.MODE", "none", *args.opts, "SOLVER.MAX_ITER", str(iters)]
    opts += ["DATASETS.TEST", f"('{VAL}',)", "TEST.EVAL_PERIOD", str(args.eval_period)]
    opts += ["DATALOADER.NUM_WORKERS", str(args.workers), "VIS_PERIOD", "0"]
    config = os.path.join(args.config_dir, setting["config"].format(fam=args.family))
    return (f"candidate {args.candidate}, {name} = {iters}", out, config, opts, iters)


def teacher_long_run(args):
    """(label, folder, config, overrides, iterations) of the teacher at twice the setting's
    schedule (2 T), the cached teacher's config and overrides otherwise, evaluated on val only:
    whether the cached teacher (T) is at its own plateau, and how far ahead a longer one is."""
    setting = SETTINGS["plateau"]
    iters = 2 * setting["teacher_iters"]
    out = os.path.join(args.output, f"{args.family}_teacher_{iters}")
    opts = ["SOLVER.MAX_ITER", str(iters), "DATASETS.TEST", f"('{VAL}',)"]
    opts += ["DATALOADER.NUM_WORKERS", str(args.workers), "VIS_PERIOD", "0"]
    config = os.path.join(args.config_dir, setting["teacher_config"].format(fam=args.family))
    return (f"teacher, 2 T = {iters}", out, config, opts, iters)


def runs(args):
    """[(label, output folder, config file, overrides, iterations)] of the S and 2 S runs."""
    setting = SETTINGS["plateau"]
    bench = SimpleNamespace(
        setting="plateau",
        iters=args.iters,
        eval_period=args.eval_period,
        seeds=[0],
        workers=args.workers,
        config_dir=args.config_dir,
    )
    teacher = os.path.join(args.bench_output, f"{args.family}_teacher", "model_final.pth")
    out, config, opts = _variant_run(bench, args.family, "none", 0, teacher, args.bench_output, [])
    long_iters = 2 * args.iters
    long_out = os.path.join(args.output, f"{args.family}_none_s0_{long_iters}")
    long_opts = [
        "SEED",
        "0",
        "TID.MODE",
        "none",
        "SOLVER.MAX_ITER",
        str(long_iters),
        "DATASETS.TEST",
        f"('{VAL}',)",
        "TEST.EVAL_PERIOD",
        str(args.eval_period),
        "DATALOADER.NUM_WORKERS",
        str(args.workers),
        "VIS_PERIOD",
        "0",
    ]
    long_config = os.path.join(args.config_dir, setting["config"].format(fam=args.family))
    return [
        (f"S = {args.iters}", out, config, opts, args.iters),
        (f"2 S = {long_iters}", long_out, long_config, long_opts, long_iters),
    ]


def _train(args, run, threads):
    label, out, config, opts, iters = run
    train_or_reuse(
        config, out, opts, VAL, iters, args.reuse, label, quiet=args.parallel > 1, threads=threads
    )
    return ap_curve(out, VAL)


def seed_std(args):
    """The student alone's seed std of val AP at S from the benchmark's records (>= 2 seeds)."""
    if args.seed_std is not None:
        return args.seed_std, "--seed-std"
    path = os.path.join(args.results, f"{args.family}_plateau_runs.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        alone = [r["val_AP"] for r in json.load(f)["runs"] if r["mode"] == "none"]
    if len(alone) < 2:
        return None, None
    return (
        mean_std(alone)[1],
        f"{len(alone)} seeds of the student alone in {os.path.basename(path)}",
    )


def finished(curve, iters):
    """Whether a run's val curve [(iterations, AP)] has its evaluation at the schedule's end."""
    return bool(curve) and curve[-1][0] >= iters


def curve_row(run, curve, done):
    """A report row: the run, its val AP per evaluation, its final AP or "unfinished"."""
    return {
        "run": run,
        "val AP per evaluation (iteration: AP)": ", ".join(f"{it}: {ap:.1f}" for it, ap in curve)
        or "-",
        "final": f"{curve[-1][1]:.2f}" if curve and done else "unfinished",
    }


def within_std(diff, std):
    """The plateau verdict of an AP difference against one seed std."""
    if std is None:
        return "pending (no seed std)"
    return "holds" if abs(diff) <= std else "does NOT hold"


def plot(curves, teacher, path, family, teacher2=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, curve in curves.items():
        if curve:
            x, y = zip(*curve)
            ax.plot(x, y, "-o", ms=3, label=f"student alone, {label}")
    if teacher:
        x, y = zip(*teacher)
        ax.plot(x, y, "-s", ms=3, color="k", label="teacher")
    if teacher2:
        x, y = zip(*teacher2)
        ax.plot(x, y, "--s", ms=3, color="0.4", label="teacher, 2 T")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"AP on {VAL}")
    ax.set_title(f"{family}, plateau setting: val AP during training (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="fcos", choices=FAMILIES)
    p.add_argument("--iters", type=int, default=SETTINGS["plateau"]["iters"], help="S")
    p.add_argument("--eval-period", type=int, default=SETTINGS["plateau"]["eval_period"])
    p.add_argument("--workers", type=int, default=1, help="data-loader workers per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--seed-std", type=float, default=None, help="seed std of val AP at S")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs, resume stopped ones")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the evaluations there are (runs still going elsewhere)",
    )
    p.add_argument("--output", default=os.path.join(REPO_ROOT, "output", "plateau_curve"))
    p.add_argument(
        "--bench-output",
        default=os.path.join(REPO_ROOT, "output", SETTINGS["plateau"]["output"]),
        help="the plateau benchmark's run folders (its none s0 run and its teacher)",
    )
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--config-dir", default=os.path.join(REPO_ROOT, "configs", "shapes"))
    p.add_argument(
        "--candidate",
        default=None,
        metavar="NAME",
        help="train (or read) only a candidate student of another split, named NAME, given by the "
        "KEY VALUE overrides that follow; the report adds its row and its teacher-lead check",
    )
    p.add_argument(
        "--teacher",
        action="store_true",
        help="train (or read) only the teacher at twice its schedule; the report adds its plateau "
        "check and the lead it would have",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of --candidate")
    args = p.parse_args(argv)
    if args.opts and not args.candidate:
        p.error("KEY VALUE overrides need --candidate NAME")
    if args.teacher and args.candidate:
        p.error("--teacher trains the teacher only; run --candidate separately")

    from tid_d2.data import ensure_generated

    for split in ("train", "val", "test"):
        ensure_generated(f"tid_shapes_{split}")
    start = time.time()
    todo = runs(args)
    long_teacher = teacher_long_run(args)
    if args.report_only:
        train = []
    elif args.teacher:
        train = [long_teacher]
    else:
        train = candidate_runs(args) if args.candidate else todo
        # the S run is the benchmark's none s0 run: once finished it is read as the benchmark
        # trained it, with whatever overrides that invocation had (e.g. a TID.LOSS_WEIGHT, idle
        # for the student alone), not refused for differing from this script's
        s_run = todo[0]
        if args.reuse and finished(ap_curve(s_run[1], VAL), s_run[4]):
            train = [r for r in train if r is not s_run]
    if args.candidate:
        todo = todo + candidate_runs(args)
    threads = threads_per_run(min(args.parallel, max(1, len(train))))
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(lambda r: _train(args, r, threads), train))
    curves = {label: ap_curve(out, VAL) for label, out, *_ in todo}
    teacher_dir = os.path.join(args.bench_output, f"{args.family}_teacher")
    teacher = ap_curve(teacher_dir, VAL)
    teacher_done = finished(teacher, SETTINGS["plateau"]["teacher_iters"])
    # the teacher at 2 T: reported when trained here or already there
    t2_label, t2_out, *_, t2_iters = long_teacher
    teacher2 = ap_curve(t2_out, VAL)
    teacher2_done = finished(teacher2, t2_iters)

    (s_label, *_), (l_label, *_) = todo[:2]
    final = {label: (c[-1] if c else None) for label, c in curves.items()}
    # a run is finished when its last evaluation is at its own schedule's end
    done = {label: finished(curves[label], n) for label, *_, n in todo}
    std, std_from = seed_std(args)
    rows = [
        curve_row(f"student alone, {label}", curve, done[label]) for label, curve in curves.items()
    ]
    rows.append(curve_row("teacher", teacher, teacher_done))
    if teacher2:
        rows.append(curve_row(t2_label, teacher2, teacher2_done))
    checks = []
    if done[s_label] and done[l_label]:
        diff = final[s_label][1] - final[l_label][1]
        if std is None:
            verdict = "pending (no seed std of the student alone yet)"
        else:
            verdict = "holds" if abs(diff) <= std else "does NOT hold"
        checks.append(
            f"- plateau: val AP at {s_label} minus at {l_label} = {diff:+.2f}; one seed std = "
            + (f"{std:.2f} ({std_from})" if std is not None else "unknown")
            + f": {verdict}."
        )
    else:
        checks.append("- plateau: pending (a run is unfinished).")

    def lead_check(name, label, suffix="", teacher_ap=None, teacher_name="teacher"):
        """'- name: teacher minus the student of ``label`` ... holds / does NOT hold'."""
        teacher_ap = teacher[-1][1] if teacher_ap is None else teacher_ap
        lead = teacher_ap - final[label][1]
        ok = "holds" if lead >= MIN_TEACHER_LEAD else "does NOT hold"
        return (
            f"- {name}: {teacher_name} val AP {teacher_ap:.2f} minus the student's at {label} "
            f"{final[label][1]:.2f} = {lead:+.2f} (needs >= {MIN_TEACHER_LEAD:.0f}): {ok}{suffix}."
        )

    if teacher_done and done[l_label]:
        checks.append(lead_check("something to distil", l_label))
    elif teacher_done and done[s_label]:
        checks.append(lead_check("something to distil", s_label, f" at S ({l_label} unfinished)"))
    else:
        checks.append("- something to distil: pending (teacher or the 2 S run unfinished).")
    if args.teacher or teacher2:
        if teacher_done and teacher2_done:
            diff = teacher[-1][1] - teacher2[-1][1]
            verdict = within_std(diff, std)
            checks.append(
                f"- teacher plateau: val AP at T = {teacher[-1][0]} minus at 2 T = {t2_iters} = "
                f"{diff:+.2f}; one seed std of the student alone = "
                + (f"{std:.2f}" if std is not None else "unknown")
                + f": {verdict}."
            )
            where = l_label if done[l_label] else (s_label if done[s_label] else None)
            if where:
                checks.append(
                    lead_check(
                        "something to distil from the 2 T teacher",
                        where,
                        teacher_ap=teacher2[-1][1],
                        teacher_name=t2_label,
                    )
                )
        else:
            checks.append("- teacher plateau: pending (the teacher or its 2 T run unfinished).")
    if args.candidate:
        (c_s, *_), (c_l, *_) = todo[2:4]
        if done[c_s] and done[c_l]:
            diff = final[c_s][1] - final[c_l][1]
            verdict = within_std(diff, std)
            checks.append(
                f"- candidate {args.candidate} plateau: val AP at {c_s} minus at {c_l} = "
                f"{diff:+.2f}: {verdict}."
            )
        else:
            checks.append(f"- candidate {args.candidate} plateau: pending (a run is unfinished).")
        where = c_l if done[c_l] else c_s
        if teacher_done and done[where]:
            suffix = (
                f" (`{shlex.join(args.opts)}`" + ("" if where == c_l else "; 2 S unfinished") + ")"
            )
            checks.append(lead_check(f"candidate {args.candidate}", where, suffix))
        else:
            checks.append(
                f"- candidate {args.candidate}: pending (teacher or candidate unfinished)."
            )

    stem = f"{args.family}_plateau_curve" + (f"_{args.candidate}" if args.candidate else "")
    stem += "_teacher" if args.teacher else ""
    os.makedirs(args.results, exist_ok=True)
    text = (
        f"### {args.family}, plateau setting: the student alone's schedule on {VAL} (seed 0)\n\n"
        + format_table(rows, ["run", "val AP per evaluation (iteration: AP)", "final"])
        + "\n\n"
        + "\n".join(checks)
        + f"\n\nCommand: `{command_line('benchmarks/plateau_curve.py')}` "
        f"({(time.time() - start) / 60:.0f} min).\n"
    )
    with open(os.path.join(args.results, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, f"{stem}.json"), "w") as f:
        json.dump(
            {
                "family": args.family,
                "iters": args.iters,
                "curves": curves,
                "teacher_curve": teacher,
                "teacher_2T_curve": teacher2,
                "seed_std": std,
                "machine": machine_info(),
                "code": code_version(),
                "command": command_line("benchmarks/plateau_curve.py"),
            },
            f,
            indent=1,
        )
    plot(curves, teacher, os.path.join(args.results, f"{stem}.png"), args.family, teacher2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
