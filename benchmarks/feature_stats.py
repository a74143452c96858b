#!/usr/bin/env python
"""Per-level scale of trained students' FPN features on the same validation images.

For each run folder, the student in ``model_final.pth`` (a TID checkpoint loads into the plain
student; its adapters are ignored) runs its backbone + FPN in eval mode on the first ``--images``
images of ``--dataset``; printed and written per level: the root mean square of the features
and the mean over images and channels of the per-channel spatial std. Distillation that changes
the scale of some levels but not others shows here: RetinaNet's head is shared by all levels.

    python benchmarks/feature_stats.py output/sweep/none_3k output/sweep/tid_l0.01_all_ch_aw_3k \\
        --config configs/shapes/retinanet_r18_student.yaml --name retinanet_feature_stats
writes benchmarks/results/<name>.md / .json.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    command_line,
    format_table,
    repo_relative,
    write_results,
)


def level_stats(config, opts, weights, inputs):
    """{level: (rms, mean per-channel std)} of the FPN features of the student in ``weights``."""
    import torch
    from detectron2.modeling import build_model

    from tid_d2.config import get_cfg
    from tid_d2.engine import TIDCheckpointer

    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    model = build_model(cfg).eval()
    TIDCheckpointer(model).load(weights)
    with torch.no_grad():
        feats = model.backbone(model.preprocess_image(inputs).tensor)
    return {
        lv: (float(x.pow(2).mean().sqrt()), float(x.std(dim=(2, 3)).mean()))
        for lv, x in feats.items()
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run folders holding model_final.pth")
    p.add_argument("--config", required=True, help="the plain student config of every run")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides of that config")
    p.add_argument("--dataset", default="tid_shapes_val")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="feature_stats", help="file stem of the results")
    args = p.parse_args(argv)

    import torch
    from detectron2.data import DatasetCatalog, DatasetMapper

    import tid_d2  # noqa: F401
    from tid_d2.config import get_cfg
    from tid_d2.data import ensure_generated

    torch.set_num_threads(1)
    cfg = get_cfg()
    cfg.merge_from_file(args.config)
    cfg.merge_from_list(args.opts)
    ensure_generated(args.dataset)
    mapper = DatasetMapper(cfg, is_train=False)
    inputs = [mapper(d) for d in DatasetCatalog.get(args.dataset)[: args.images]]
    rows, data = [], {}
    for run in args.runs:
        stats = level_stats(args.config, args.opts, os.path.join(run, "model_final.pth"), inputs)
        data[run] = stats
        row = {"run": repo_relative(run)}
        row.update({f"{lv} rms / ch std": f"{r:.2f} / {s:.2f}" for lv, (r, s) in stats.items()})
        rows.append(row)
    md = (
        f"FPN feature scale per level ({args.dataset}, first {args.images} images, eval mode):\n\n"
        + format_table(rows, list(rows[0]))
        + f"\n\nCommand: `{command_line('benchmarks/feature_stats.py')}`\n"
    )
    write_results(args.results, args.name, md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
