#!/usr/bin/env python
"""Validation sweep: how the imitation loss's scale and options change the student, on
tid_shapes_val only (the test split is never looked at here).

Each setting is one ``train_net.py`` run per seed (RetinaNet, the shipped 1000-iteration schedule)
against one teacher trained by ``configs/shapes/retinanet_mnv2_teacher.yaml``; runs are kept in
``output/sweep/<name>`` (seed 0) or ``output/sweep/<name>_s<seed>`` and reused with ``--reuse``.
With several ``--seeds`` a setting's row gives the mean and standard deviation over the seeds of
every setting that has all of them. Writes ``benchmarks/results/
retinanet_val_sweep.md`` and ``.json`` (val AP fields, the final losses and the exact command of
every run).

    python benchmarks/val_sweep.py --parallel 2 --reuse
    python benchmarks/val_sweep.py --only none tid_l0.01   # a subset
    python benchmarks/val_sweep.py --only none tid_l0.01 --seeds 0 1 2 --reuse
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (  # noqa: E402
    AP_FIELDS,
    REPO_ROOT,
    ap_curve,
    cached_teacher,
    command_line,
    final_ap,
    fmt_mean_std,
    format_table,
    has_final_ap,
    machine_info,
    mark_teacher,
    mean_std,
    read_metrics,
    reuse_state,
    threads_per_run,
    train_net,
    write_results,
)

VAL = "tid_shapes_val"
STUDENT = "retinanet_r18_student.yaml"
TID = "tid_retinanet.yaml"
TEACHER = "retinanet_mnv2_teacher.yaml"
SELF = "tid_retinanet_self.yaml"
MNV2S = "retinanet_mnv2_fpn64_student.yaml"
MNV2S_TID = "tid_retinanet_mnv2_student.yaml"


def imitate(mode, loss_weight, *extra):
    """Overrides of one imitation setting: ``TID.MODE mode TID.LOSS_WEIGHT loss_weight extra...``."""
    return ["TID.MODE", mode, "TID.LOSS_WEIGHT", loss_weight, *extra]


ALL_LEVELS = ("TID.REGION.NORMALIZE", "all_levels")
LOCATIONS = ("TID.REGION.NORMALIZE", "locations")
# the three remedies that together made imitation harmless at lambda 0.01 (seed 0, then 3 seeds)
ALL_CH_AW = imitate(
    "tid", "0.01", *ALL_LEVELS, "TID.FEATURE_NORM", "channel", "TID.ADAPTER_WARMUP_ITERS", "300"
)
# stands for the trained teacher's detection head alone (tools/extract_weights.py --keep head.)
TEACHER_HEAD = "<teacher_head>"
# adapters fixed at an orthogonal start (every singular value 1)
ORTH_FIXED = ("TID.ADAPTER_INIT", "orthogonal", "TID.ADAPTER_TRAIN", "False")
# three times the shipped schedule, with the val AP at every 1000 iterations
LONG = ["SOLVER.MAX_ITER", "3000", "TEST.EVAL_PERIOD", "1000"]

# (name, config in configs/shapes, overrides, what it tests)
SETTINGS = [
    ("none", STUDENT, [], "student alone"),
    ("fitnet_l1", TID, imitate("fitnet", "1.0"), "uniform imitation"),
    (
        "fitnet_l0.13",
        TID,
        imitate("fitnet", "0.13"),
        "uniform, initial loss ~2.2 (scale measured in dependencies.md)",
    ),
    ("tid_l0.1", TID, imitate("tid", "0.1"), "TID, lambda 0.1"),
    ("tid_l0.01", TID, imitate("tid", "0.01"), "TID, lambda 0.01"),
    ("tid_l0.001", TID, imitate("tid", "0.001"), "TID, lambda 0.001"),
    (
        "tid_ch_l0.03",
        TID,
        imitate("tid", "0.03", "TID.FEATURE_NORM", "channel"),
        "TID, per-channel feature standardisation",
    ),
    (
        "tid_l0.01_aw300",
        TID,
        imitate("tid", "0.01", "TID.ADAPTER_WARMUP_ITERS", "300"),
        "TID, adapters trained alone for 300 iterations",
    ),
    (
        "tid_l0.01_p345",
        TID,
        imitate("tid", "0.01", "TID.IN_FEATURES", '["p3","p4","p5"]'),
        "TID on p3-p5 only",
    ),
    (
        "tid_l0.01_all",
        TID,
        imitate("tid", "0.01", *ALL_LEVELS),
        "TID, each region normalised over all levels",
    ),
    (
        "tid_l0.05_all",
        TID,
        imitate("tid", "0.05", *ALL_LEVELS),
        "TID, each region normalised over all levels",
    ),
    (
        "tid_l0.003_all",
        TID,
        imitate("tid", "0.003", *ALL_LEVELS),
        "TID, all-levels normalisation, lambda 0.003",
    ),
    (
        "tid_l0.01_all_ch_aw",
        TID,
        ALL_CH_AW,
        "TID, all-levels normalisation + channel standardisation + adapter warm-up",
    ),
    (
        "fitnet_all_l0.3",
        TID,
        imitate("fitnet", "0.3", *ALL_LEVELS),
        "uniform, every location the same weight, initial loss ~2 (dependencies.md scale)",
    ),
    (
        "fitnet_all_l0.03",
        TID,
        imitate("fitnet", "0.03", *ALL_LEVELS),
        "uniform, every location the same weight, lambda 0.03",
    ),
    ("none_3k", STUDENT, LONG, "student alone, 3000 iterations"),
    ("tid_l0.01_all_ch_aw_3k", TID, ALL_CH_AW + LONG, "as tid_l0.01_all_ch_aw, 3000 iterations"),
    (
        "mnv2s_none",
        MNV2S,
        [],
        "pretrained MobileNetV2-FPN64 student alone",
    ),
    (
        "mnv2s_tid_l0.01",
        MNV2S_TID,
        imitate("tid", "0.01"),
        "pretrained MobileNetV2-FPN64 student, TID lambda 0.01",
    ),
    # self-distillation: the student has the teacher's architecture (identity adapters)
    ("self_none", TEACHER, [], "teacher architecture alone (MobileNetV2-FPN128, ImageNet init)"),
    ("self_fitnet_l0.01", SELF, imitate("fitnet", "0.01"), "self-distillation, uniform imitation"),
    ("self_tid_l0.01", SELF, imitate("tid", "0.01"), "self-distillation, TID lambda 0.01"),
    (
        "self_tid_l0.01_conv",
        SELF,
        imitate("tid", "0.01", "TID.ADAPTER", "conv"),
        "self-distillation, TID lambda 0.01 through a 1x1 conv adapter",
    ),
    (
        "self_tid_l0.01_orth",
        SELF,
        imitate("tid", "0.01", "TID.ADAPTER", "conv", "TID.ADAPTER_INIT", "orthogonal"),
        "self-distillation, TID lambda 0.01 through an orthogonally initialised 1x1 conv adapter",
    ),
    (
        "tid_l0.01_orth",
        TID,
        imitate("tid", "0.01", "TID.ADAPTER_INIT", "orthogonal"),
        "TID, lambda 0.01, orthogonally initialised adapters",
    ),
    (
        "mnv2s_tid_l0.01_orth",
        MNV2S_TID,
        imitate("tid", "0.01", "TID.ADAPTER_INIT", "orthogonal"),
        "pretrained MobileNetV2-FPN64 student, TID lambda 0.01, orthogonal adapters",
    ),
    (
        "mnv2s_fitnet_l0.01_orth",
        MNV2S_TID,
        imitate("fitnet", "0.01", "TID.ADAPTER_INIT", "orthogonal"),
        "pretrained MobileNetV2-FPN64 student, uniform imitation, orthogonal adapters",
    ),
    (
        "self_none_head",
        TEACHER,
        ["MODEL.WEIGHTS", TEACHER_HEAD],
        "teacher architecture alone, detection head started from the trained teacher's",
    ),
    (
        "self_tid_l0.01_head",
        SELF,
        imitate("tid", "0.01", "MODEL.WEIGHTS", TEACHER_HEAD),
        "self-distillation, TID lambda 0.01, head started from the trained teacher's",
    ),
    (
        "self_tid_l0.01_orthfix",
        SELF,
        imitate("tid", "0.01", "TID.ADAPTER", "conv", *ORTH_FIXED),
        "self-distillation, TID lambda 0.01 through a fixed random rotation",
    ),
    (
        "self_none_distiller",
        SELF,
        ["TID.MODE", "none"],
        "teacher architecture alone through the TIDDistiller (TID.MODE none)",
    ),
    ("self_tid_l0.001", SELF, imitate("tid", "0.001"), "self-distillation, TID lambda 0.001"),
    (
        "self_tid_l0.01_loc",
        SELF,
        imitate("tid", "0.01", *LOCATIONS),
        "self-distillation, TID lambda 0.01, regions normalised by the level's location count",
    ),
    (
        "self_fitnet_l0.001",
        SELF,
        imitate("fitnet", "0.001"),
        "self-distillation, uniform imitation, lambda 0.001",
    ),
    (
        "self_tid_l0.001_head",
        SELF,
        imitate("tid", "0.001", "MODEL.WEIGHTS", TEACHER_HEAD),
        "self-distillation, TID lambda 0.001, head started from the trained teacher's",
    ),
    (
        "tid_l0.01_loc",
        TID,
        imitate("tid", "0.01", *LOCATIONS),
        "TID, lambda 0.01, regions normalised by the level's location count",
    ),
    (
        "tid_l0.03_loc",
        TID,
        imitate("tid", "0.03", *LOCATIONS),
        "TID, lambda 0.03, regions normalised by the level's location count",
    ),
    (
        "tid_l0.1_loc",
        TID,
        imitate("tid", "0.1", *LOCATIONS),
        "TID, lambda 0.1, regions normalised by the level's location count",
    ),
    (
        "tid_l0.03_loc_rest0.25",
        TID,
        imitate("tid", "0.03", *LOCATIONS, "TID.REGION.WEIGHTS", "[1.0,1.0,0.25]"),
        "as tid_l0.03_loc, rest weight alpha_rest 0.25 instead of 0.05",
    ),
    (
        "mnv2s_tid_l0.01_orthfix",
        MNV2S_TID,
        imitate("tid", "0.01", *ORTH_FIXED),
        "pretrained MobileNetV2-FPN64 student, TID lambda 0.01, fixed orthogonal adapters",
    ),
    # the pretrained student (the paper's setting: both backbones ImageNet-initialised) under the
    # shipped TID, the location-normalised TID that was harmless on the ResNet-18, and uniform
    (
        "mnv2s_tid_l0.001",
        MNV2S_TID,
        imitate("tid", "0.001"),
        "pretrained MobileNetV2-FPN64 student, TID lambda 0.001 (shipped)",
    ),
    (
        "mnv2s_tid_l0.01_loc",
        MNV2S_TID,
        imitate("tid", "0.01", *LOCATIONS),
        "pretrained MobileNetV2-FPN64 student, TID lambda 0.01, location-count normalisation",
    ),
    (
        "mnv2s_fitnet_l0.001",
        MNV2S_TID,
        imitate("fitnet", "0.001"),
        "pretrained MobileNetV2-FPN64 student, uniform imitation lambda 0.001",
    ),
]


# the student-alone config each TID config is compared with
_STUDENT_OF = {
    TID: STUDENT,
    MNV2S_TID: MNV2S,
    SELF: TEACHER,
}


def cfg_for_base(config):
    return _STUDENT_OF.get(config, config)


def schedule(opts) -> int:
    """Training iterations of a setting: its SOLVER.MAX_ITER override, else the shipped 1000."""
    opts = list(opts)
    return int(opts[opts.index("SOLVER.MAX_ITER") + 1]) if "SOLVER.MAX_ITER" in opts else 1000


def base_key(config, opts):
    """Which student-alone run a setting is compared with: same student, same schedule, same
    starting weights."""
    opts = list(opts)
    weights = opts[opts.index("MODEL.WEIGHTS") + 1] if "MODEL.WEIGHTS" in opts else ""
    return cfg_for_base(config), schedule(opts), weights


def _final_losses(out):
    rows = [r for r in read_metrics(out) if "loss_cls" in r]
    last = rows[-1] if rows else {}
    tid = sum(v for k, v in last.items() if k.startswith("loss_tid_"))
    return {
        "loss_cls": last.get("loss_cls"),
        "loss_box_reg": last.get("loss_box_reg"),
        "loss_tid": tid if any(k.startswith("loss_tid_") for k in last) else None,
    }


def _finished_seeds(output, name, iters):
    """Seeds with a finished ``iters``-iteration run of setting ``name`` in ``output``."""
    seeds = [0] if has_final_ap(os.path.join(output, name), VAL, iters=iters) else []
    prefix = f"{name}_s"
    for entry in os.listdir(output) if os.path.isdir(output) else []:
        seed = entry[len(prefix) :]
        if (
            entry.startswith(prefix)
            and seed.isdigit()
            and has_final_ap(os.path.join(output, entry), VAL, iters=iters)
        ):
            seeds.append(int(seed))
    return seeds


def seed_rows(settings, records):
    """One table row per setting: AP fields as mean (± sample std) over its seeds, and the mean
    AP difference to the student alone of the same student architecture over the seeds both
    have."""
    by_name = {}
    for r in records:
        by_name.setdefault(r["name"], {})[r["seed"]] = r
    base_runs = {
        base_key(c, o): by_name[n]
        for n, c, o, _ in settings
        if not c.startswith("tid_") and n in by_name
    }
    rows = []
    for name, config, opts, what in settings:
        runs = by_name.get(name)
        if not runs:  # no finished run to report (``--reuse`` with an empty ``--seeds``)
            continue
        row = {"setting": name, "what": what, "seeds": len(runs)}
        for f in AP_FIELDS:
            row[f] = fmt_mean_std(*mean_std([r[f] for r in runs.values()]))
        base = base_runs.get(base_key(config, opts))
        shared = sorted(set(runs) & set(base)) if base else []
        if shared:
            diff = mean_std([runs[s]["AP"] - base[s]["AP"] for s in shared])
            row["AP - alone"] = fmt_mean_std(*diff, signed=True)
        else:
            row["AP - alone"] = "-"
        for k in ("loss_cls", "loss_tid"):
            vals = [r[k] for r in runs.values() if r[k] is not None]
            row[k] = f"{sum(vals) / len(vals):.3f}" if vals else "-"
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="*", default=None, help="names of settings to run")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (1 thread each if 2)")
    p.add_argument("--output", default=os.path.join(REPO_ROOT, "output", "sweep"))
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished runs in --output and resume stopped ones (same settings only)",
    )
    p.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[0],
        help="SEED of each run; with --reuse and no value: only the runs already finished",
    )
    p.add_argument(
        "--name", default="retinanet_val_sweep", help="file stem of the results (.md / .json)"
    )
    args = p.parse_args(argv)
    # every run, the teacher's included, on its share of the cores
    threads = threads_per_run(args.parallel)
    cfg_dir = os.path.join(REPO_ROOT, "configs", "shapes")
    settings = [s for s in SETTINGS if args.only is None or s[0] in args.only]
    start = time.time()

    teacher_dir = os.path.join(args.output, "teacher")
    if cached_teacher(teacher_dir, 1000) is None:
        train_net(
            os.path.join(cfg_dir, TEACHER),
            teacher_dir,
            ["DATALOADER.NUM_WORKERS", "1"],
            label="teacher",
            threads=threads,
        )
        mark_teacher(teacher_dir, 1000)
    teacher = os.path.join(teacher_dir, "model_final.pth")
    teacher_head = os.path.join(args.output, "teacher_head.pth")
    if any(TEACHER_HEAD in s[2] for s in settings) and not os.path.isfile(teacher_head):
        sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
        from extract_weights import extract

        extract(teacher, ["head."], teacher_head)

    def run(job):
        (name, config, opts, _), seed = job
        out = os.path.join(args.output, name if seed == 0 else f"{name}_s{seed}")
        opts = [teacher_head if o == TEACHER_HEAD else o for o in opts]
        full = ["DATALOADER.NUM_WORKERS", "1", "VIS_PERIOD", "0"] + opts
        if seed != 0:
            full += ["SEED", str(seed)]
        if config.startswith("tid_"):  # a TIDDistiller config: the sweep's teacher
            full = ["TID.TEACHER.WEIGHTS", teacher] + full
        config_file = os.path.join(cfg_dir, config)
        state = reuse_state(out, config_file, full, VAL, schedule(opts)) if args.reuse else "new"
        if state != "finished":
            train_net(
                config_file,
                out,
                full,
                label=name,
                quiet=True,
                resume=state == "resumable",
                threads=threads,
            )
        shown = [os.path.relpath(o, REPO_ROOT) if o.startswith(REPO_ROOT) else o for o in full]
        cmd = (
            f"python train_net.py --config-file configs/shapes/{config} "
            f"OUTPUT_DIR {os.path.relpath(out, REPO_ROOT)} " + " ".join(shown)
        )
        return {
            "name": name,
            "seed": seed,
            "command": cmd,
            **final_ap(out, VAL),
            **_final_losses(out),
            "val_curve": ap_curve(out, VAL),
        }

    jobs = [(s, seed) for s in settings for seed in args.seeds]
    if args.reuse:  # also every other seed already finished on disk, so one table holds all
        jobs += [
            (s, seed)
            for s in settings
            for seed in _finished_seeds(args.output, s[0], schedule(s[2]))
        ]
        unique = {(j[0][0], j[1]): j for j in jobs}
        jobs = sorted(unique.values(), key=lambda j: (settings.index(j[0]), j[1]))
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        records = list(pool.map(run, jobs))
    seeds_used = sorted({r["seed"] for r in records})
    teacher_ap = final_ap(teacher_dir, VAL)["AP"]
    rows = seed_rows(settings, records)
    cols = ["setting", "what", "seeds", *AP_FIELDS, "AP - alone", "loss_cls", "loss_tid"]
    seeds = ", ".join(str(s) for s in seeds_used)
    spread = "; mean ± std over the seeds each setting has" if len(seeds_used) > 1 else ""
    curves = [
        f"- {r['name']} seed {r['seed']}: "
        + ", ".join(f"{ap:.2f} at {it}" for it, ap in r["val_curve"])
        for r in records
        if len(r["val_curve"]) > 1
    ]
    md = (
        f"### retinanet on {VAL} (seed{'s' if len(seeds_used) > 1 else ''} {seeds}{spread}; "
        f"1000 iterations unless a setting says otherwise; teacher val AP {teacher_ap:.2f})\n\n"
        + format_table(rows, cols)
        + "\n\nloss_cls / loss_tid: training losses at the last logged iteration (loss_tid "
        "includes lambda).\n\n"
        + ("Val AP at each evaluation:\n\n" + "\n".join(curves) + "\n\n" if curves else "")
        + f"Command: `{command_line('benchmarks/val_sweep.py')}` "
        + f"({(time.time() - start) / 60:.0f} min for the runs not reused, {args.parallel} at "
        f"once, on {machine_info()['cpu']}). Each run:\n\n"
        + f"- teacher: `python train_net.py --config-file configs/shapes/retinanet_mnv2_teacher.yaml "
        f"OUTPUT_DIR {os.path.relpath(teacher_dir, REPO_ROOT)} DATALOADER.NUM_WORKERS 1`\n"
        + "\n".join(f"- `{r['command']}`" for r in records)
        + "\n"
    )
    data = {"teacher_val_AP": teacher_ap, "runs": records}
    write_results(args.results, args.name, md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
