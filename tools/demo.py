#!/usr/bin/env python
"""The main job: teacher -> student alone -> TID student on the embedded tid_shapes data.

1. generates tid_shapes (first run only);
2. trains the MobileNetV2-FPN teacher (or reuses output/demo/<family>_teacher/model_final.pth
   when it was trained on the same tid_shapes data and schedule);
3. trains the ResNet-18 student alone (``TID.MODE none``, the same code path) and the TID
   student on the same schedule; the TID run first evaluates the teacher (strict-load check);
4. evaluates all three on tid_shapes_test with COCOEvaluator and prints one table, also written
   to output/demo/results.md.

    python tools/demo.py [--family retinanet] [--iters 1000] [--output output/demo]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    cached_teacher,
    final_ap,
    format_table,
    mark_teacher,
    train_net,
)

TEST = "tid_shapes_test"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="retinanet", choices=["retinanet", "fcos", "rcnn"])
    parser.add_argument("--iters", type=int, default=1000, help="iterations of each training run")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "output", "demo"))
    parser.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    args = parser.parse_args(argv)

    from tid_d2.data import ensure_generated

    start = time.time()
    print("[demo] tid_shapes: generating on first use", flush=True)
    for split in ("train", "val", "test"):
        ensure_generated(f"tid_shapes_{split}")

    fam = args.family
    cfg_dir = os.path.join(REPO_ROOT, "configs", "shapes")
    schedule = ["SOLVER.MAX_ITER", str(args.iters), "DATASETS.TEST", f"('{TEST}',)"]
    teacher_dir = os.path.join(args.output, f"{fam}_teacher")
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    rows = []

    if args.retrain_teacher or cached_teacher(teacher_dir, args.iters) is None:
        print(
            f"[demo] 1/3 training the teacher ({fam}, MobileNetV2-FPN128, ImageNet init)",
            flush=True,
        )
        secs = train_net(
            os.path.join(cfg_dir, f"{fam}_mnv2_teacher.yaml"),
            teacher_dir,
            schedule,
            label="teacher",
        )
        mark_teacher(teacher_dir, args.iters)
    else:
        print(f"[demo] 1/3 reusing the cached teacher {teacher_weights}", flush=True)
        secs = 0.0
    rows.append(
        {"model": "teacher (MobileNetV2-FPN128)", **final_ap(teacher_dir), "train min": secs / 60}
    )

    tid_cfg = os.path.join(cfg_dir, f"tid_{fam}.yaml")
    teacher_opts = ["TID.TEACHER.WEIGHTS", teacher_weights]
    for step, (mode, name) in enumerate(
        [("none", "student alone (R18-FPN64)"), ("tid", "TID student (R18-FPN64)")], 2
    ):
        out = os.path.join(args.output, f"{fam}_student_{mode}")
        print(f"[demo] {step}/3 training the {name}", flush=True)
        extra = ["TID.TEACHER.EVAL_BEFORE_TRAIN", "True"] if mode == "tid" else []
        secs = train_net(
            tid_cfg, out, schedule + teacher_opts + ["TID.MODE", mode] + extra, label=mode
        )
        rows.append({"model": name, **final_ap(out), "train min": secs / 60})

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
