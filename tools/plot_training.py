#!/usr/bin/env python
"""Training curves from detectron2's metrics.json: detection losses, loss_tid terms, key / weak /
rest shares and evaluation AP. Several runs are overlaid (e.g. TID vs student alone).

    python tools/plot_training.py output/demo/retinanet_student_tid output/demo/retinanet_student_none \\
        --labels TID "student alone" --output docs/training_curves.png
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import read_metrics  # noqa: E402


def _series(records, key_pred):
    """{key: [(iteration, value)]} sorted by iteration. A resumed run logs the iterations after its
    last checkpoint again: the later record of an iteration wins."""
    out = {}
    for r in records:
        if "iteration" not in r:
            continue
        for k, v in r.items():
            if key_pred(k) and isinstance(v, (int, float)):
                out.setdefault(k, {})[r["iteration"] + 1] = v
    return {k: sorted(points.items()) for k, points in out.items()}


def plot(run_dirs, labels, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("detection losses", lambda k: k.startswith("loss_") and not k.startswith("loss_tid")),
        ("loss_tid per level", lambda k: k.startswith("loss_tid")),
        ("key / weak / rest shares", lambda k: k.startswith("tid/") and k.endswith("_share")),
        ("bbox AP", lambda k: k.endswith("bbox/AP")),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    styles = ["-", "--", ":", "-."]
    for run, label, style in zip(run_dirs, labels, styles * 4):
        records = read_metrics(run)
        if not records:
            raise FileNotFoundError(f"no metrics.json records in '{run}'")
        for ax, (title, pred) in zip(axes.ravel(), panels):
            for k, pts in sorted(_series(records, pred).items()):
                x, y = zip(*pts)
                ax.plot(
                    x, y, style, marker="o" if len(pts) < 15 else None, label=f"{label}: {k}", lw=1
                )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
    for ax in axes.ravel():
        if ax.lines:
            ax.legend(fontsize=6)
        else:
            ax.text(
                0.5, 0.5, "not in these runs", ha="center", transform=ax.transAxes, color="gray"
            )
    axes[0, 0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run folders holding metrics.json")
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--output", default="training_curves.png")
    args = p.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        print("plot_training: error: give one label per run", file=sys.stderr)
        return 2
    try:
        print(plot(args.runs, labels, args.output))
    except FileNotFoundError as e:
        print(f"plot_training: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
