#!/usr/bin/env python
"""Validation sweep: how the imitation loss's scale and options change the student, on
tid_shapes_val only (the test split is never looked at here).

Each setting is one ``train_net.py`` run (RetinaNet, seed 0, the shipped 1000-iteration schedule)
against one teacher trained by ``configs/shapes/retinanet_mnv2_teacher.yaml``; runs are kept in
``output/sweep/<name>`` and reused with ``--reuse``. Writes ``benchmarks/results/
retinanet_val_sweep.md`` and ``.json`` (val AP fields, the final losses and the exact command of
every run).

    python benchmarks/val_sweep.py --parallel 2 --reuse
    python benchmarks/val_sweep.py --only none tid_l0.01   # a subset
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
    cached_teacher,
    final_ap,
    format_table,
    mark_teacher,
    read_metrics,
    train_net,
    write_results,
)

VAL = "tid_shapes_val"
STUDENT = "retinanet_r18_student.yaml"
TID = "tid_retinanet.yaml"

# (name, config in configs/shapes, overrides, what it tests)
SETTINGS = [
    ("none", STUDENT, [], "student alone"),
    ("fitnet_l1", TID, ["TID.MODE", "fitnet", "TID.LOSS_WEIGHT", "1.0"], "uniform imitation"),
    (
        "fitnet_l0.13",
        TID,
        ["TID.MODE", "fitnet", "TID.LOSS_WEIGHT", "0.13"],
        "uniform, initial loss ~2.2 (scale measured in dependencies.md)",
    ),
    ("tid_l0.1", TID, ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.1"], "TID, lambda 0.1"),
    ("tid_l0.01", TID, ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.01"], "TID, lambda 0.01"),
    ("tid_l0.001", TID, ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.001"], "TID, lambda 0.001"),
    (
        "tid_ch_l0.03",
        TID,
        ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.03", "TID.FEATURE_NORM", "channel"],
        "TID, per-channel feature standardisation",
    ),
    (
        "tid_l0.01_aw300",
        TID,
        ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.01", "TID.ADAPTER_WARMUP_ITERS", "300"],
        "TID, adapters trained alone for 300 iterations",
    ),
    (
        "tid_l0.01_p345",
        TID,
        ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.01", "TID.IN_FEATURES", '["p3","p4","p5"]'],
        "TID on p3-p5 only",
    ),
    (
        "tid_l0.01_all",
        TID,
        ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.01", "TID.REGION.NORMALIZE", "all_levels"],
        "TID, each region normalised over all levels",
    ),
    (
        "tid_l0.05_all",
        TID,
        ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.05", "TID.REGION.NORMALIZE", "all_levels"],
        "TID, each region normalised over all levels",
    ),
    (
        "tid_l0.003_all",
        TID,
        ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.003", "TID.REGION.NORMALIZE", "all_levels"],
        "TID, all-levels normalisation, lambda 0.003",
    ),
    (
        "tid_l0.01_all_ch_aw",
        TID,
        [
            "TID.MODE",
            "tid",
            "TID.LOSS_WEIGHT",
            "0.01",
            "TID.REGION.NORMALIZE",
            "all_levels",
            "TID.FEATURE_NORM",
            "channel",
            "TID.ADAPTER_WARMUP_ITERS",
            "300",
        ],
        "TID, all-levels normalisation + channel standardisation + adapter warm-up",
    ),
    (
        "mnv2s_none",
        "retinanet_mnv2_fpn64_student.yaml",
        [],
        "pretrained MobileNetV2-FPN64 student alone",
    ),
    (
        "mnv2s_tid_l0.01",
        "tid_retinanet_mnv2_student.yaml",
        ["TID.MODE", "tid", "TID.LOSS_WEIGHT", "0.01"],
        "pretrained MobileNetV2-FPN64 student, TID lambda 0.01",
    ),
]


# the student-alone config each TID config is compared with
_STUDENT_OF = {TID: STUDENT, "tid_retinanet_mnv2_student.yaml": "retinanet_mnv2_fpn64_student.yaml"}


def cfg_for_base(config):
    return _STUDENT_OF.get(config, config)


def _final_losses(out):
    rows = [r for r in read_metrics(out) if "loss_cls" in r]
    last = rows[-1] if rows else {}
    tid = sum(v for k, v in last.items() if k.startswith("loss_tid_"))
    return {
        "loss_cls": last.get("loss_cls"),
        "loss_box_reg": last.get("loss_box_reg"),
        "loss_tid": tid if any(k.startswith("loss_tid_") for k in last) else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="*", default=None, help="names of settings to run")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (1 thread each if 2)")
    p.add_argument("--output", default=os.path.join(REPO_ROOT, "output", "sweep"))
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --output")
    args = p.parse_args(argv)
    if args.parallel > 1:
        threads = str(max(1, (os.cpu_count() or 2) // args.parallel))
        os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cfg_dir = os.path.join(REPO_ROOT, "configs", "shapes")
    settings = [s for s in SETTINGS if args.only is None or s[0] in args.only]
    start = time.time()

    teacher_dir = os.path.join(args.output, "teacher")
    if cached_teacher(teacher_dir, 1000) is None:
        train_net(
            os.path.join(cfg_dir, "retinanet_mnv2_teacher.yaml"),
            teacher_dir,
            ["DATALOADER.NUM_WORKERS", "1"],
            label="teacher",
        )
        mark_teacher(teacher_dir, 1000)
    teacher = os.path.join(teacher_dir, "model_final.pth")

    def run(setting):
        name, config, opts, _ = setting
        out = os.path.join(args.output, name)
        full = ["DATALOADER.NUM_WORKERS", "1", "VIS_PERIOD", "0"] + opts
        if config.startswith("tid_"):  # a TIDDistiller config: the sweep's teacher
            full = ["TID.TEACHER.WEIGHTS", teacher] + full
        try:
            done = args.reuse and bool(final_ap(out, VAL))
        except RuntimeError:
            done = False
        if not done:
            train_net(os.path.join(cfg_dir, config), out, full, label=name, quiet=True)
        shown = [os.path.relpath(o, REPO_ROOT) if o.startswith(REPO_ROOT) else o for o in full]
        cmd = (
            f"python train_net.py --config-file configs/shapes/{config} "
            f"OUTPUT_DIR {os.path.relpath(out, REPO_ROOT)} " + " ".join(shown)
        )
        return {"name": name, "command": cmd, **final_ap(out, VAL), **_final_losses(out)}

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        records = list(pool.map(run, settings))
    teacher_ap = final_ap(teacher_dir, VAL)["AP"]
    # each setting against the student alone of its own student architecture
    bases = {
        cfg_for_base(c): r["AP"]
        for (_, c, _, _), r in zip(settings, records)
        if not c.startswith("tid_")
    }
    rows = []
    for (name, config, _, what), r in zip(settings, records):
        row = {"setting": name, "what": what, **{f: r[f] for f in AP_FIELDS}}
        base = bases.get(cfg_for_base(config))
        row["AP - alone"] = f"{r['AP'] - base:+.2f}" if base is not None else "-"
        for k in ("loss_cls", "loss_tid"):
            row[k] = "-" if r[k] is None else f"{r[k]:.3f}"
        rows.append(row)
    cols = ["setting", "what", *AP_FIELDS, "AP - alone", "loss_cls", "loss_tid"]
    md = (
        f"### retinanet on {VAL} (seed 0, 1000 iterations; teacher val AP {teacher_ap:.2f})\n\n"
        + format_table(rows, cols)
        + "\n\nloss_cls / loss_tid: training losses at the last logged iteration (loss_tid "
        "includes lambda).\n\nCommand: `python benchmarks/val_sweep.py "
        + " ".join(sys.argv[1:])
        + f"` ({(time.time() - start) / 60:.0f} min for the runs not reused; each run takes "
        "12-16 min on one core with two runs at once on the 2-core CPU). Each run:\n\n"
        + f"- teacher: `python train_net.py --config-file configs/shapes/retinanet_mnv2_teacher.yaml "
        f"OUTPUT_DIR {os.path.relpath(teacher_dir, REPO_ROOT)} DATALOADER.NUM_WORKERS 1`\n"
        + "\n".join(f"- `{r['command']}`" for r in records)
        + "\n"
    )
    data = {"teacher_val_AP": teacher_ap, "runs": records}
    write_results(args.results, "retinanet_val_sweep", md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
