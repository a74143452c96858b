#!/usr/bin/env python
"""Scaling of the significance + region + loss computation alone (the part TID adds on top of a
student step and a teacher forward) with the number of GT boxes per image and the image size.

Each point runs in a fresh subprocess: the student's training forward and the teacher's forward
run first (not timed), then ``TIDDistiller._maps`` + the imitation loss are timed over a few
repeats. Extra memory = the growth of the process's peak resident set during the timed part
(``ru_maxrss``; ``torch.cuda.max_memory_allocated`` growth on a GPU), i.e. what the significance
computation needs beyond a training step.

    python benchmarks/scaling.py --family retinanet
writes benchmarks/results/<family>_scaling.md / .json.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (
    REPO_ROOT,
    command_line,
    format_table,
    peak_memory_mb,
    run_child,
    write_results,
)  # noqa: E402

GT_COUNTS = [1, 10, 100, 1000]
AREA_SCALES = [1, 2, 4]


def measure(family, num_gt, area_scale, repeats, base_size, batch):
    import torch
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    import tid_d2  # noqa: F401
    from tid_d2.config import get_cfg
    from tid_d2.modeling.imitation import region_imitation_loss

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", "shapes", f"tid_{family}.yaml"))
    # Random-initialised teacher of the same config: the cost does not depend on its weights.
    tcfg_path = cfg.TID.TEACHER.CONFIG_FILE
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tid_scaling_teacher_{family}.pth")
    if not os.path.isfile(tmp):
        tcfg = get_cfg()
        tcfg.merge_from_file(os.path.join(REPO_ROOT, tcfg_path))
        tcfg.MODEL.MOBILENET.IMAGENET_INIT = False
        torch.save({"model": build_model(tcfg).state_dict()}, tmp)
    cfg.TID.TEACHER.CONFIG_FILE = os.path.join(REPO_ROOT, tcfg_path)
    cfg.TID.TEACHER.WEIGHTS = tmp
    model = build_model(cfg)
    device = torch.device(cfg.MODEL.DEVICE)
    size = int(round(base_size * area_scale**0.5 / 32)) * 32
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batch):
        xy = torch.rand(num_gt, 2, generator=g) * size * 0.9
        wh = 4 + torch.rand(num_gt, 2, generator=g) * size * 0.2
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1))
        inst.gt_classes = torch.randint(0, 6, (num_gt,), generator=g)
        img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        data.append({"image": img, "instances": inst, "height": size, "width": size})
    model.train()
    times = []
    with EventStorage(0):
        model.student(data)  # student forward: hooks capture, not timed
        s_feats = model.student_probe.features
        _ = model._maps(data)  # warm-up (teacher forward included)
        base = peak_memory_mb(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = peak_memory_mb(device)
        for _ in range(repeats):
            model.teacher_probe.run(  # the teacher forward is not part of the measured cost
                model._teacher_images(
                    data, tuple(model.student_probe.captured["input_shape"][-2:])
                ),
                None,
            )
            t = time.perf_counter()
            maps = model._maps_from_captured(data)
            loss = sum(
                region_imitation_loss(
                    model.tid_adapters(lv, s_feats[lv]),
                    maps["teacher_features"][lv],
                    maps["regions"][lv],
                )
                for lv in model.in_features
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        extra = peak_memory_mb(device) - base
    print(
        json.dumps(
            {
                "num_gt": num_gt,
                "area_scale": area_scale,
                "image_size": size,
                "batch": batch,
                "sec": statistics.median(times),
                "extra_peak_mb": max(0.0, extra),
                "loss": float(loss),
            }
        )
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="retinanet", choices=["retinanet", "fcos", "rcnn"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base-size", type=int, default=160)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--child", nargs=2, type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        measure(
            args.family, int(args.child[0]), args.child[1], args.repeats, args.base_size, args.batch
        )
        return 0
    points = (
        [(n, 1) for n in GT_COUNTS] + [(10, a) for a in AREA_SCALES[1:]] + [(1000, AREA_SCALES[-1])]
    )
    rows = []
    for n, a in points:
        cmd = [
            sys.executable,
            __file__,
            "--family",
            args.family,
            "--repeats",
            str(args.repeats),
            "--base-size",
            str(args.base_size),
            "--batch",
            str(args.batch),
            "--child",
            str(n),
            str(a),
        ]
        r = run_child(cmd, f"scaling point {n} GT x{a}")
        rows.append(r)
        print(
            f"[scaling] {args.family} GT/image {n:5d} area x{a}: {r['sec'] * 1000:.1f} ms, extra peak {r['extra_peak_mb']:.0f} MB",
            flush=True,
        )
    table = [
        {
            "GT boxes / image": r["num_gt"],
            "image": f"{r['image_size']} px (x{r['area_scale']:g} area)",
            "ms (sig + regions + loss)": r["sec"] * 1000,
            "extra peak MB": r["extra_peak_mb"],
        }
        for r in rows
    ]
    md = (
        f"Significance + regions + loss alone ({args.family}, batch {args.batch}, median of {args.repeats}; "
        "includes the teacher-side significance, excludes the two forwards):\n\n"
        + format_table(
            table,
            ["GT boxes / image", "image", "ms (sig + regions + loss)", "extra peak MB"],
            "{:.1f}",
        )
        + f"\n\nCommand: `{command_line('benchmarks/scaling.py')}`\n"
    )
    write_results(args.results, f"{args.family}_scaling", md, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
