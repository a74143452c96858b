#!/usr/bin/env python
"""Pictures of where TID distils: per FPN level, the input with GT boxes, the teacher's and the
student's significance, and the key / weak / rest regions, one PNG per image.

    python tools/visualize_significance.py --config-file configs/shapes/tid_retinanet.yaml \\
        --weights output/shapes/tid_retinanet/model_final.pth --dataset tid_shapes_val \\
        --num-images 4 --output docs/significance
    python tools/visualize_significance.py --config-file ... --weights ... --images a.jpg b.jpg

Images given as files have no GT boxes: every location is then scored as background.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def load_inputs(cfg, dataset, images, num_images):
    """detectron2 input dicts (test-time resize, GT boxes when the dataset has them)."""
    from detectron2.data import DatasetMapper

    from tid_d2.engine import image_dicts

    mapper = DatasetMapper(cfg, is_train=False)
    mapper.is_train = True  # keep the annotations (test-time augmentation, no flips)
    return [mapper(d) for d in image_dicts(dataset, images, num_images)]


def figure(inp, maps, levels, input_format, out_path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from tid_d2.visualization import REGION_COLORS, SIG_MAX, draw_boxes, input_rgb, region_overlay

    img = input_rgb(inp["image"], input_format)
    boxes = inp["instances"].gt_boxes.tensor.numpy() if "instances" in inp else np.zeros((0, 4))
    has_sig = maps["sig_teacher"] is not None
    cols = 4 if has_sig else 2
    fig, axes = plt.subplots(
        len(levels), cols, figsize=(2.4 * cols, 2.4 * len(levels)), squeeze=False
    )
    extent = (0, img.shape[1], img.shape[0], 0)
    names = set()
    for r, level in enumerate(levels):
        ax = axes[r]
        ax[0].imshow(draw_boxes(img, boxes, (255, 255, 0)))
        ax[0].set_ylabel(level)
        c = 1
        if has_sig:
            for who in ("teacher", "student"):
                sig = maps[f"sig_{who}"][level][0].cpu().numpy()
                im = ax[c].imshow(
                    sig,
                    vmin=0,
                    vmax=SIG_MAX,
                    cmap="viridis",
                    extent=extent,
                    interpolation="nearest",
                )
                c += 1
        regions = [(n, m[0]) for n, m, _ in maps["regions"][level]]
        names.update(n for n, _ in regions)
        ax[c].imshow(region_overlay(img, regions))
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    heads = ["input + GT"] + (["Sig teacher", "Sig student"] if has_sig else []) + ["regions"]
    for a, h in zip(axes[0], heads):
        a.set_title(h, fontsize=9)
    if has_sig:
        fig.colorbar(
            im,
            ax=axes.ravel().tolist(),
            location="right",
            shrink=0.5,
            pad=0.02,
            label="significance Score_c x Score_r",
        )
    order = [
        n
        for n in ("key", "weak", "key+weak", "rest", "all")
        if n in names or (n == "key+weak" and {"key", "weak"} <= names)
    ]
    handles = [Patch(color=np.array(REGION_COLORS[n]) / 255.0, label=n) for n in order]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.savefig(out_path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file", required=True, help="the TID config (teacher from TID.TEACHER.*)"
    )
    p.add_argument(
        "--weights", default=None, help="student / TID checkpoint (default MODEL.WEIGHTS)"
    )
    p.add_argument("--dataset", default="tid_shapes_val", help="registered dataset to draw from")
    p.add_argument("--images", nargs="*", default=None, help="image files instead of a dataset")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--levels", nargs="*", default=None, help="FPN levels to draw (default: all)")
    p.add_argument("--output", default="significance")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    import tid_d2  # noqa: F401
    from detectron2.modeling import build_model

    from tid_d2.config import get_cfg
    from tid_d2.engine import TIDCheckpointer
    from tid_d2.lazy import is_lazy_config

    if is_lazy_config(args.config_file):  # a Python (LazyConfig) TID config (overrides a.b=c)
        from tid_d2.lazy_engine import lazy_significance_setup

        try:
            model, inputs, input_format, mode = lazy_significance_setup(
                args.config_file,
                args.opts,
                args.weights,
                args.dataset,
                args.images,
                args.num_images,
            )
        except ValueError as e:
            print(f"visualize_significance: error: {e}", file=sys.stderr)
            return 2
        return write_pictures(model, inputs, input_format, mode, args)
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "TIDDistiller":
        print(
            f"visualize_significance: error: '{args.config_file}' is not a TID config",
            file=sys.stderr,
        )
        return 2
    if cfg.TID.MODE == "none":
        cfg.TID.MODE = "tid"
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    cfg.freeze()
    model = build_model(cfg)
    weights = args.weights if args.weights is not None else cfg.MODEL.WEIGHTS
    if weights:
        TIDCheckpointer(model, allow_pickle=cfg.TID.ALLOW_PICKLE_WEIGHTS).load(weights)
    inputs = load_inputs(cfg, args.dataset, args.images, args.num_images)
    return write_pictures(model, inputs, cfg.INPUT.FORMAT, cfg.TID.MODE, args)


def write_pictures(model, inputs, input_format: str, mode: str, args) -> int:
    """One PNG per input (:func:`figure`) under ``args.output``; prints the files."""
    from tqdm import tqdm

    levels = args.levels or model.in_features
    os.makedirs(args.output, exist_ok=True)
    written = []
    for i, inp in enumerate(tqdm(inputs, desc="significance pictures", disable=len(inputs) < 3)):
        maps = model.inspect([inp])
        name = os.path.splitext(os.path.basename(inp.get("file_name", f"image{i}")))[0]
        out = os.path.join(args.output, f"significance_{name}.png")
        figure(
            inp,
            maps,
            levels,
            input_format,
            out,
            f"{os.path.basename(args.config_file)} [{mode}] {name}",
        )
        written.append(out)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
