#!/usr/bin/env python
"""Cost of distillation on identical batches: seconds per training step and peak memory of the
student alone, of teacher inference alone (what TID runs of the teacher), and of every variant.

Each measurement runs in its own subprocess on the same 8 tid_shapes training images (fixed,
mapped once), so peak memory is per measurement: ``torch.cuda.max_memory_allocated`` on a GPU,
the process's peak resident set (``ru_maxrss``) on the CPU, which includes the framework's own
footprint.

    python benchmarks/cost.py --family retinanet --steps 10
writes benchmarks/results/<family>_cost.md and <family>_cost.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (
    BENCHMARK_MODES as MODES,
    REPO_ROOT,
    command_line,
    format_table,
    peak_memory_mb,
    run_child,
    write_results,
)  # noqa: E402


def _batch(cfg, n):
    from detectron2.data import DatasetCatalog, DatasetMapper

    from tid_d2.data import ensure_generated

    ensure_generated("tid_shapes_train")
    mapper = DatasetMapper(cfg, is_train=True)
    mapper.augmentations.augs = mapper.augmentations.augs[:1]  # resize only: identical batches
    return [mapper(d) for d in DatasetCatalog.get("tid_shapes_train")[:n]]


def model_and_batch(family, mode, batch, teacher_weights, opts=()):
    """The family's TID model (configs/shapes/tid_<family>.yaml + ``opts``) in ``mode``, seeded,
    and ``batch`` fixed training inputs; returns (model, inputs, torch device)."""
    import torch
    from detectron2.modeling import build_model

    import tid_d2  # noqa: F401
    from tid_d2.config import get_cfg

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", "shapes", f"tid_{family}.yaml"))
    cfg.merge_from_list(list(opts))
    cfg.TID.TEACHER.WEIGHTS = teacher_weights
    cfg.TID.MODE = mode
    # every timed step sees the same batch: a teacher cache would skip the teacher in all of them
    cfg.TID.TEACHER.CACHE_MB = 0
    return build_model(cfg), _batch(cfg, batch), torch.device(cfg.MODEL.DEVICE)


def training_step(model, data):
    """One training step as cost.py times it and step_ops.py counts it: forward on ``data``,
    backward, and an SGD (momentum 0.9) update of the trainable parameters. Puts the model in
    training mode; returns ``step(storage)``."""
    import torch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    model.train()

    def step(storage):
        losses = model(data)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        storage.iter += 1

    return step


def measure(family, what, steps, batch, teacher_weights, threads, opts=()):
    """Runs in the child process; prints one JSON line."""
    import torch
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(threads)
    mode = "tid" if what == "teacher" else what
    model, data, device = model_and_batch(family, mode, batch, teacher_weights, opts)
    times = []
    if what == "teacher":
        model.train()
        padded = None
        with torch.no_grad(), EventStorage(0):
            # not timed: the padded size, and (two-stage) the boxes the student's ROI head
            # sampled, which TID also runs through the teacher's box head
            model.student(data)
            padded = tuple(model.student_probe.captured["input_shape"][-2:])
            roi_boxes = model.student_probe.roi_boxes()
            for i in range(steps + 2):
                t = time.perf_counter()
                model.teacher_probe.run(model._teacher_images(data, padded), roi_boxes)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    else:
        step = training_step(model, data)
        with EventStorage(0) as storage:
            for i in range(steps + 2):
                t = time.perf_counter()
                step(storage)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    times = times[2:]  # warm-up
    print(
        json.dumps(
            {
                "what": what,
                "device": device.type,
                "sec_per_iter": statistics.median(times),
                "peak_mem_mb": peak_memory_mb(device),
            }
        )
    )


def measurement_args(description: str, steps: int):
    """The arguments of the measurements on identical batches (cost.py, step_ops.py):
    family, steps, batch, threads, teacher weights, modes, results folder, config overrides."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="retinanet", choices=["retinanet", "fcos", "rcnn"])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher-weights", default=None, help="default: output/bench/<family>_teacher")
    p.add_argument("--modes", nargs="*", default=MODES)
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    return p


def parse_measurement_args(p, argv):
    """Parse, with the config overrides last; ``teacher_weights`` defaults to the benchmark's
    cached teacher of the family."""
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.DEVICE cuda"
    )
    args = p.parse_args(argv)
    args.teacher_weights = args.teacher_weights or os.path.join(
        REPO_ROOT, "output", "bench", f"{args.family}_teacher", "model_final.pth"
    )
    return args


def main(argv=None):
    p = measurement_args(__doc__, steps=10)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parse_measurement_args(p, argv)
    weights = args.teacher_weights
    if args.child:
        measure(args.family, args.child, args.steps, args.batch, weights, args.threads, args.opts)
        return 0
    rows = {}
    for what in ["teacher"] + list(args.modes):
        cmd = [
            sys.executable,
            __file__,
            "--family",
            args.family,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--threads",
            str(args.threads),
            "--teacher-weights",
            weights,
            "--child",
            what,
            *args.opts,
        ]
        rows[what] = run_child(cmd, f"the cost of {what}")
        print(
            f"[cost] {args.family} {what:8s} {rows[what]['sec_per_iter']:.3f} s/iter  peak {rows[what]['peak_mem_mb']:.0f} MB",
            flush=True,
        )
    floor = (
        rows["none"]["sec_per_iter"] + rows["teacher"]["sec_per_iter"] if "none" in rows else None
    )
    table = []
    for what, r in rows.items():
        row = {
            "measured": (
                "teacher inference" if what == "teacher" else f"train step, TID.MODE {what}"
            ),
            "sec/iter": r["sec_per_iter"],
            "peak MB": r["peak_mem_mb"],
        }
        if floor and what not in ("teacher", "none"):
            row["step / (student step + teacher inf.)"] = r["sec_per_iter"] / floor
        table.append(row)
    device = rows["teacher"]["device"]  # as the measurements' config resolved it
    peak = "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS"
    md = (
        f"Cost on identical batches ({args.family}, {device}, batch {args.batch}, {args.threads} threads, median of "
        f"{args.steps} steps; peak = {peak}):\n\n"
        + format_table(
            table,
            ["measured", "sec/iter", "peak MB", "step / (student step + teacher inf.)"],
            "{:.3f}",
        )
        + f"\n\nCommand: `{command_line('benchmarks/cost.py')}`\n"
    )
    write_results(args.results, f"{args.family}_cost", md, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
