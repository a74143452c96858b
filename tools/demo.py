#!/usr/bin/env python
"""The main job: teacher -> student alone -> TID student on the embedded tid_shapes data.

1. generates tid_shapes (first run only);
2. trains the MobileNetV2-FPN teacher (or reuses output/demo/<family>_teacher/model_final.pth
   when it was trained on the same tid_shapes data and schedule) and, side by side with it, the
   ResNet-18 student alone (``TID.MODE none``, the same code path; it needs no teacher), each on
   half the cores;
3. trains the TID student on the same schedule, on every core (with a cached teacher, the two
   students side by side); the TID run first evaluates the teacher (strict-load check);
4. evaluates all three on tid_shapes_test with COCOEvaluator and prints one table, also written
   to output/demo/results.md and results.json.

    python tools/demo.py [--family fcos] [--iters 1000] [--output output/demo] [KEY VALUE ...]

The default family is FCOS, the one where imitation from this teacher measurably helps the
student on this data (README, "FCOS test benchmark"); ``--family retinanet`` or ``rcnn`` runs the
same pipeline for the two families where it does not.

Trailing ``KEY VALUE`` pairs override the config of every run (teacher included), as in
``run_benchmark.py``. ``--sequential`` trains one model after the other, each on every core
(slower on 2 cores: these small models gain little from a second thread).
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    cached_teacher,
    final_ap,
    format_table,
    mark_teacher,
    threads_per_run,
    train_net,
)

TEST = "tid_shapes_test"
MODES = {"none": "student alone (R18-FPN64)", "tid": "TID student (R18-FPN64)"}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="fcos", choices=["fcos", "retinanet", "rcnn"])
    parser.add_argument("--iters", type=int, default=1000, help="iterations of each training run")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "output", "demo"))
    parser.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="train one model after the other, each on every core, not independent ones side by side",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args(argv)

    from tid_d2.data import ensure_generated

    start = time.time()
    print("[demo] tid_shapes: generating on first use", flush=True)
    for split in ("train", "val", "test"):
        ensure_generated(f"tid_shapes_{split}")

    fam = args.family
    cfg_dir = os.path.join(REPO_ROOT, "configs", "shapes")
    schedule = ["SOLVER.MAX_ITER", str(args.iters), "DATASETS.TEST", f"('{TEST}',)"] + args.opts
    teacher_dir = os.path.join(args.output, f"{fam}_teacher")
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    tid_cfg = os.path.join(cfg_dir, f"tid_{fam}.yaml")
    teacher_opts = ["TID.TEACHER.WEIGHTS", teacher_weights]
    student_dirs = {mode: os.path.join(args.output, f"{fam}_student_{mode}") for mode in MODES}

    def train_teacher(threads=None):
        secs = train_net(
            os.path.join(cfg_dir, f"{fam}_mnv2_teacher.yaml"),
            teacher_dir,
            schedule,
            label="teacher",
            threads=threads,
        )
        mark_teacher(teacher_dir, args.iters)
        return secs

    def train_student(mode, threads=None):
        extra = ["TID.TEACHER.EVAL_BEFORE_TRAIN", "True"] if mode == "tid" else []
        return train_net(
            tid_cfg,
            student_dirs[mode],
            schedule + teacher_opts + ["TID.MODE", mode] + extra,
            label=mode,
            threads=threads,
        )

    need_teacher = args.retrain_teacher or cached_teacher(teacher_dir, args.iters) is None
    jobs = {
        "teacher": (f"the teacher ({fam}, MobileNetV2-FPN128, ImageNet init)", train_teacher),
        "none": (f"the {MODES['none']}", lambda threads: train_student("none", threads)),
        "tid": (f"the {MODES['tid']}", lambda threads: train_student("tid", threads)),
    }
    # independent runs side by side: the student alone needs no teacher, and with a cached
    # teacher the two students need nothing from each other
    stages = [["teacher", "none"], ["tid"]] if need_teacher else [["none", "tid"]]
    cores = os.cpu_count() or 1
    if args.sequential or cores < 2:
        stages = [[name] for stage in stages for name in stage]
    minutes = {"teacher": 0.0}
    if not need_teacher:
        print(f"[demo] reusing the cached teacher {teacher_weights}", flush=True)
    for stage in stages:
        threads = threads_per_run(len(stage))
        what = " and ".join(jobs[name][0] for name in stage)
        how = f" side by side, {threads} thread(s) each" if len(stage) > 1 else ""
        print(f"[demo] training {what}{how}", flush=True)
        with ThreadPoolExecutor(max_workers=len(stage)) as pool:
            running = {name: pool.submit(jobs[name][1], threads) for name in stage}
            for name, job in running.items():
                minutes[name] = job.result() / 60

    rows = [
        {
            "model": "teacher (MobileNetV2-FPN128)",
            **final_ap(teacher_dir),
            "train min": minutes["teacher"],
        }
    ]
    for mode, name in MODES.items():
        rows.append({"model": name, **final_ap(student_dirs[mode]), "train min": minutes[mode]})

    table = format_table(rows, ["model", "AP", "AP50", "AP75", "APs", "APm", "APl", "train min"])
    gain = rows[2]["AP"] - rows[1]["AP"]
    gap = rows[0]["AP"] - rows[1]["AP"]
    summary = (
        f"COCO bbox AP on {TEST} ({fam}, {args.iters} iterations each)\n\n{table}\n\n"
        f"TID - student alone: {gain:+.2f} AP; teacher - student alone: {gap:+.2f} AP"
        + (f" (TID recovers {100 * gain / gap:.0f}% of the gap)" if gap > 0 else "")
        + f"\nTotal time: {(time.time() - start) / 60:.1f} min"
    )
    print("\n" + summary, flush=True)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(summary + "\n")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
