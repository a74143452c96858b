#!/usr/bin/env python
"""What one training step asks of the device, per variant: operations, kernel launches, copies
and host syncs, counted with ``torch.profiler`` on the same fixed batch as ``cost.py``.

On a GPU these small models are bound by launching operations, not by arithmetic (see the H200
cost tables), so the count of operations TID adds is what its GPU overhead follows:

- ``ops``: top-level ``aten::`` operators (those not called by another aten operator), forward,
  backward and optimizer step together, on any device;
- on CUDA also ``launches`` (kernel launches), ``copies`` (``cudaMemcpy*`` calls: host-device
  copies and reads of values) and ``syncs`` (``cuda*Synchronize`` calls: the host waits for the
  GPU).

Each mode is counted over ``--steps`` profiled steps (the step cost.py times) after two warm-up steps, in one process.

    python benchmarks/step_ops.py --family retinanet MODEL.DEVICE cuda
writes benchmarks/results/<family>_step_ops.md and .json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cost import (  # noqa: E402
    model_and_batch,
    measurement_args,
    parse_measurement_args,
    training_step,
)
from tid_d2.runs import REPO_ROOT, command_line, format_table, write_results  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def count_events(events) -> dict:
    """Per-kind counts of profiler events (objects with ``name`` and ``cpu_parent``)."""
    counts = {"ops": 0, "launches": 0, "copies": 0, "syncs": 0}
    for e in events:
        name = e.name
        if name.startswith("aten::"):
            parent = e.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                counts["ops"] += 1
        elif name in LAUNCHES:
            counts["launches"] += 1
        elif name.startswith("cudaMemcpy"):
            counts["copies"] += 1
        elif name.startswith("cuda") and name.endswith("Synchronize"):
            counts["syncs"] += 1
    return counts


def profile_steps(family, mode, steps, batch, teacher_weights, opts=()) -> dict:
    """Counts per step (mean over ``steps`` profiled training steps) of one mode."""
    import torch
    from detectron2.utils.events import EventStorage
    from torch.profiler import ProfilerActivity, profile

    model, data, device = model_and_batch(family, mode, batch, teacher_weights, opts)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step = training_step(model, data)
    with EventStorage(0) as storage:
        for _ in range(2):  # warm-up: lazy initialisation, cudnn autotuning
            step(storage)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step(storage)
            if device.type == "cuda":
                torch.cuda.synchronize()
    counts = count_events(prof.events())
    out = {k: v / steps for k, v in counts.items()}
    out["device"] = device.type
    return out


def main(argv=None):
    args = parse_measurement_args(measurement_args(__doc__, steps=3), argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = {}
    for mode in args.modes:
        rows[mode] = profile_steps(
            args.family, mode, args.steps, args.batch, args.teacher_weights, args.opts
        )
        print(f"[step_ops] {args.family} {mode:8s} {rows[mode]}", flush=True)
    device = next(iter(rows.values()))["device"]
    columns = ["mode", "ops"] + (["launches", "copies", "syncs"] if device == "cuda" else [])
    base = rows.get("none")
    table = []
    for mode, r in rows.items():
        row = {"mode": mode, **{k: r[k] for k in columns[1:]}}
        if base and mode != "none":
            row["ops added"] = r["ops"] - base["ops"]
        table.append(row)
    md = (
        f"Per training step ({args.family}, {device}, batch {args.batch}, mean of {args.steps} "
        "profiled steps; ops = top-level aten operators of forward, backward and optimizer "
        "step; launches, copies and syncs on CUDA only):\n\n"
        + format_table(table, columns + (["ops added"] if base else []), "{:.0f}")
        + f"\n\nCommand: `{command_line('benchmarks/step_ops.py')}`\n"
    )
    write_results(args.results, f"{args.family}_step_ops", md, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
