#!/usr/bin/env python
"""Where a distilled student's remaining gap to its teacher sits: in its FPN features or in the
head that reads them.

For each ``--checkpoint`` of a student trained with a TID config, it evaluates on ``--dataset``
(COCO AP, detectron2's COCOEvaluator):

- ``student``: the student as trained (its own FPN and head);
- ``teacher head on student FPN, fitted map``: the frozen teacher's head (and its anchors,
  box decoding, NMS) reading the student's FPN features mapped to the teacher's widths by one 1x1
  conv per level fitted by least squares (ridge ``--ridge``) to the teacher's features on
  ``--fit-images`` training images, every location weighted alike; the same map for every
  checkpoint, so students trained with and without imitation compare on equal terms;
- ``teacher head on student FPN, trained adapter``: the same with the distiller's own adapters
  (``tid_adapters.*``), when the checkpoint has them;
- ``teacher head on teacher FPN, projected onto the adapter's image``: the teacher's own features
  replaced by the closest point a 1x1 adapter ``A s + b`` can output (``b + A A^+ (t - b)`` per
  location): what the imitation loss, through these adapters, can teach at best, whatever the
  student's features; its R^2 is the share of the teacher's variance any student can match;

and once, the teacher itself, and the teacher's head on the teacher's own FPN through this same
code path (it must equal the teacher's AP: a check of the swap). It also reports, per level, the
fraction of the teacher features' variance the fitted map explains (R^2 on the fitting images).

If the teacher's head on the student's features reaches about the teacher's AP, the student's
features carry what the teacher's head needs and the gap is in the student's head, which FPN
imitation does not train; if it stays at the student's AP or below, the features are the limit.

    python benchmarks/head_swap.py --config-file configs/shapes/tid_retinanet_plateau.yaml \\
        --teacher-weights output/bench_plateau/retinanet_teacher/model_final.pth \\
        --checkpoint output/bench_plateau/retinanet_none_s0/model_final.pth \\
        --checkpoint output/bench_plateau/retinanet_tid_s0/model_final.pth \\
        --stem retinanet_plateau_head_swap
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    command_line,
    format_table,
    repo_relative,
    write_results,
)

VAL = "tid_shapes_val"


def swap_backbone(student_backbone, maps, teacher_backbone):
    """An ``nn.Module`` that returns ``{level: maps[level](student_backbone(x)[level])}`` for the
    teacher's levels, with the teacher backbone's padding rules, so a detector whose backbone it
    replaces runs unchanged.

    Args:
        student_backbone: the student's Backbone, (N, 3, H, W) -> {level: (N, C_S, H_l, W_l)}.
        maps: {level: module (N, C_S, H_l, W_l) -> (N, C_T, H_l, W_l)}.
        teacher_backbone: the Backbone it stands in for (its levels, strides, size divisibility).
    """
    import torch.nn as nn

    class _Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student_backbone
            self.maps = nn.ModuleDict(maps)
            self._shape = teacher_backbone.output_shape()
            self.size_divisibility = max(
                teacher_backbone.size_divisibility, student_backbone.size_divisibility
            )
            self.padding_constraints = getattr(teacher_backbone, "padding_constraints", {})

        def output_shape(self):
            return self._shape

        def forward(self, x):
            feats = self.student(x)
            return {lv: self.maps[lv](feats[lv]) for lv in self._shape}

    return _Swapped()


def _check_levels(student_backbone, teacher_backbone):
    """The swap needs the student to have each of the teacher's levels at the same stride."""
    s_shape, t_shape = student_backbone.output_shape(), teacher_backbone.output_shape()
    for lv, t in t_shape.items():
        if lv not in s_shape or s_shape[lv].stride != t.stride:
            raise ValueError(
                f"teacher level {lv} (stride {t.stride}) has no student level of the same stride "
                f"(student levels: { {k: v.stride for k, v in s_shape.items()} })"
            )


def level_features(student, teacher, images, batch=8):
    """Yields, per chunk of ``images``, {level: (S, T, fg)}: the student's and the teacher's FPN
    features as rows, S (M, C_S) and T (M, C_T) in float64, and fg (M,) bool, whether the
    location's centre lies in a ground-truth box of its image (M = locations of the chunk).

    Args:
        student, teacher: detectors with ``backbone`` and ``preprocess_image`` (eval mode).
        images: mapped dataset dicts with "image" (3, H, W) and "instances" (gt_boxes).
    """
    import torch

    levels = teacher.backbone.output_shape()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            s_feats = student.backbone(student.preprocess_image(chunk).tensor)
            t_feats = teacher.backbone(teacher.preprocess_image(chunk).tensor)
            out = {}
            for lv, spec in levels.items():
                n, c_t, h, w = t_feats[lv].shape
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                centres = torch.stack([xs, ys], -1).reshape(-1, 2).double().add(0.5) * spec.stride
                fg = []
                for x in chunk:  # per image, as detectron2's matchers go
                    boxes = x["instances"].gt_boxes.tensor.double()
                    inside = (
                        (centres[:, None, 0] > boxes[None, :, 0])
                        & (centres[:, None, 0] < boxes[None, :, 2])
                        & (centres[:, None, 1] > boxes[None, :, 1])
                        & (centres[:, None, 1] < boxes[None, :, 3])
                    )
                    fg.append(inside.any(1))
                out[lv] = (
                    s_feats[lv].double().permute(0, 2, 3, 1).reshape(-1, s_feats[lv].shape[1]),
                    t_feats[lv].double().permute(0, 2, 3, 1).reshape(-1, c_t),
                    torch.cat(fg),
                )
            yield out


def fit_maps(student, teacher, images, ridge):
    """Least-squares 1x1 convs from the student's FPN to the teacher's, per level, every
    location of ``images`` weighted alike.

    Args:
        ridge: L2 penalty on the weights, relative to the mean diagonal of S^T S.

    Returns:
        {level: nn.Conv2d(C_S, C_T, 1)}.
    """
    import torch

    gram, cross = {}, {}
    for chunk in level_features(student, teacher, images):
        for lv, (s, t, _) in chunk.items():
            s = torch.cat([s, torch.ones_like(s[:, :1])], dim=1)  # bias column
            gram[lv] = gram.get(lv, 0) + s.T @ s
            cross[lv] = cross.get(lv, 0) + s.T @ t
    maps = {}
    for lv, g in gram.items():
        c_s = g.shape[0] - 1
        penalty = torch.zeros_like(g)
        penalty[:c_s, :c_s] = torch.eye(c_s, dtype=g.dtype) * ridge * g.diagonal()[:c_s].mean()
        w = torch.linalg.solve(g + penalty, cross[lv])  # (C_S + 1, C_T)
        maps[lv] = conv1x1(w[:c_s].T, w[c_s])
    return maps


def conv1x1(weight, bias):
    """The 1x1 ``nn.Conv2d`` computing ``weight @ x + bias`` at each location (float32).

    Args:
        weight: (C_out, C_in); bias: (C_out,).
    """
    import torch.nn as nn

    conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
    conv.weight.data.copy_(weight.reshape(*weight.shape, 1, 1).float())
    conv.bias.data.copy_(bias.float())
    return conv


def explained_variance(maps, student, teacher, images):
    """{level: (R^2 over all locations, R^2 over ground-truth-box locations)} of ``maps`` applied
    to the student's features as predictions of the teacher's on ``images``: 1 - SS_res / SS_tot,
    SS_tot about the teacher features' mean over the same locations."""
    import torch

    sums = {}
    with torch.no_grad():
        for chunk in level_features(student, teacher, images):
            for lv, (s, t, fg) in chunk.items():
                c_s = s.shape[1]
                pred = maps[lv](s.float().T.reshape(1, c_s, -1, 1)).double()
                pred = pred.reshape(t.shape[1], -1).T
                acc = sums.setdefault(lv, {})
                for key, sel in (("all", slice(None)), ("fg", fg)):
                    t_sel, r = t[sel], (t - pred)[sel]
                    prev = acc.get(key, (0.0, 0.0, 0.0, 0))
                    acc[key] = (
                        prev[0] + float((r**2).sum()),
                        prev[1] + t_sel.sum(0),
                        prev[2] + float((t_sel**2).sum()),
                        prev[3] + t_sel.shape[0],
                    )
    out = {}
    for lv, acc in sums.items():
        vals = []
        for key in ("all", "fg"):
            rss, t_sum, t_sq, n = acc[key]
            tss = t_sq - float((t_sum**2).sum()) / max(n, 1) if n else float("nan")
            vals.append(1 - rss / tss if n and tss > 0 else float("nan"))
        out[lv] = tuple(vals)
    return out


def evaluate(model, cfg, dataset):
    """COCO bbox AP fields of ``model`` on ``dataset`` (detectron2's inference_on_dataset)."""
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    evaluator = COCOEvaluator(dataset, tasks=("bbox",), output_dir=None)
    loader = build_detection_test_loader(cfg, dataset)
    return inference_on_dataset(model, loader, evaluator)["bbox"]


def adapter_module(adapters, level):
    """The distiller's trained adapter of ``level`` (``FeatureAdapters``) as a module
    (N, C_S, h, w) -> (N, C_T, h, w)."""
    import torch.nn as nn

    class _One(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapters = adapters

        def forward(self, x):
            return self.adapters(level, x)

    return _One()


def adapter_drift(run_dir, teacher_weights, trained_state):
    """{level: (cosine(init, trained), ||trained - init|| / ||init||)} of the distiller's adapter
    weights, the start rebuilt from the run's own ``config.yaml`` and ``SEED`` (same build order,
    hence the same random draws); None when the run folder has no config or no fixed seed."""
    import torch
    from detectron2.utils.env import seed_all_rng

    from tid_d2.config import get_cfg
    from tid_d2.engine import Trainer

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    cfg = get_cfg()
    cfg.merge_from_file(path)
    if cfg.SEED < 0:
        return None
    cfg.merge_from_list(["TID.TEACHER.WEIGHTS", teacher_weights, "MODEL.DEVICE", "cpu"])
    seed_all_rng(cfg.SEED)
    start = Trainer.build_model(cfg).state_dict()
    out = {}
    for key, w in trained_state.items():
        if key.startswith("tid_adapters.adapters.") and key.endswith(".weight") and key in start:
            a, b = start[key].flatten().float(), w.flatten().float()
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            out[key.split(".")[2]] = (cos, float((b - a).norm() / a.norm()))
    return out


def adapter_image_maps(adapters, levels):
    """{level: nn.Conv2d(C_T, C_T, 1)} that moves teacher features t to the nearest output of the
    adapter ``A s + b`` (A: (C_T, C_S), least squares over s): ``b + P (t - b)``, P = A A^+ the
    projector onto A's columns, i.e. the conv ``P t + (I - P) b``."""
    import torch

    out = {}
    for lv in levels:
        conv = adapters.adapters[lv]
        a = conv.weight.detach()[:, :, 0, 0].double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(a[:, 0])
        proj = a @ torch.linalg.pinv(a)
        out[lv] = conv1x1(proj, b - proj @ b)
    return out


def with_backbone(model, backbone):
    """A shallow copy of detector ``model`` whose ``backbone`` is ``backbone``; ``model`` itself
    keeps its own (the copy gets its own module table)."""
    import copy

    out = copy.copy(model)
    out._modules = dict(model._modules)
    out.backbone = backbone
    return out


def _identity_maps(backbone):
    import torch.nn as nn

    return {lv: nn.Identity() for lv in backbone.output_shape()}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="the students' TID config")
    p.add_argument("--teacher-weights", required=True)
    p.add_argument("--checkpoint", action="append", required=True, help="a student checkpoint")
    p.add_argument("--dataset", default=VAL)
    p.add_argument("--fit-images", type=int, default=64, help="training images for the fit")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--stem", default=None, help="write benchmarks/results/<stem>.{md,json}")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    import copy

    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, DatasetMapper

    from tid_d2.config import get_cfg
    from tid_d2.data import ensure_generated
    from tid_d2.engine import Trainer

    start = time.time()
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(
        ["TID.MODE", "tid", "TID.TEACHER.WEIGHTS", args.teacher_weights, "DATALOADER.NUM_WORKERS"]
        + ["0", "VIS_PERIOD", "0"]
        + list(args.opts)
    )
    cfg.freeze()
    for split in ("train", "val", "test"):
        ensure_generated(f"tid_shapes_{split}")
    torch.manual_seed(0)
    distiller = Trainer.build_model(cfg)
    distiller.eval()
    teacher = distiller.teacher
    _check_levels(distiller.student.backbone, teacher.backbone)
    student = distiller.student
    same_input = (
        distiller.student_input_format == distiller.teacher_input_format
        and torch.equal(student.pixel_mean, teacher.pixel_mean)
        and torch.equal(student.pixel_std, teacher.pixel_std)
    )
    if not same_input:
        raise ValueError(
            "the teacher's head reads the student's features of the teacher's preprocessed image: "
            "this needs the same INPUT.FORMAT and MODEL.PIXEL_MEAN / PIXEL_STD in both configs"
        )

    # training images with their boxes (the training mapper: same resize, a random flip that
    # both networks see): the first --fit-images fit the maps, the next as many measure R^2
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(0)  # the same flips for every invocation
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[: 2 * args.fit_images]
    mapped = [mapper(copy.deepcopy(d)) for d in dicts]
    fit_images, held_out = mapped[: args.fit_images], mapped[args.fit_images :]

    def r2_text(r2):
        return " / ".join(f"{a:.2f} ({f:.2f})" for a, f in r2.values())

    rows, records, drift_lines = [], [], []
    t_ap = evaluate(teacher, cfg, args.dataset)
    rows.append({"model": "teacher", "checkpoint": repo_relative(args.teacher_weights), "R^2": "-"})
    rows[-1]["AP"] = f"{t_ap['AP']:.2f}"
    records.append({"model": "teacher", "AP": t_ap})
    # the swap path itself: the teacher's head on the teacher's own backbone through the wrapper
    identity = swap_backbone(teacher.backbone, _identity_maps(teacher.backbone), teacher.backbone)
    own = with_backbone(teacher, identity)
    ap = evaluate(own, cfg, args.dataset)
    rows.append({"model": "teacher head on teacher FPN (swap path check)", "checkpoint": "-"})
    rows[-1]["R^2"] = "-"
    rows[-1]["AP"] = f"{ap['AP']:.2f}"
    records.append({"model": "swap path check", "AP": ap})

    for ckpt in args.checkpoint:
        DetectionCheckpointer(distiller).load(ckpt)
        distiller.eval()
        name = repo_relative(ckpt)
        s_ap = evaluate(student, cfg, args.dataset)
        maps = fit_maps(student, teacher, fit_images, args.ridge)
        r2 = explained_variance(maps, student, teacher, held_out)
        hybrid = with_backbone(teacher, swap_backbone(student.backbone, maps, teacher.backbone))
        h_ap = evaluate(hybrid, cfg, args.dataset)
        rec = {"checkpoint": name, "student_AP": s_ap, "fitted_AP": h_ap, "fitted_R2": r2}
        rows.append({"model": "student", "checkpoint": name, "R^2": "-", "AP": f"{s_ap['AP']:.2f}"})
        rows.append(
            {
                "model": "teacher head on student FPN, fitted map",
                "checkpoint": name,
                "R^2": r2_text(r2),
                "AP": f"{h_ap['AP']:.2f}",
            }
        )
        trained = getattr(distiller, "tid_adapters", None)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        has_adapters = any(k.startswith("tid_adapters.") for k in state.get("model", {}))
        levels = teacher.backbone.output_shape()
        if trained is not None and has_adapters and all(lv in trained.adapters for lv in levels):
            adapters = {lv: adapter_module(trained, lv) for lv in levels}
            a_r2 = explained_variance(adapters, student, teacher, held_out)
            rec["adapter_R2"] = a_r2
            hybrid = with_backbone(
                teacher, swap_backbone(student.backbone, adapters, teacher.backbone)
            )
            a_ap = evaluate(hybrid, cfg, args.dataset)
            rec["adapter_AP"] = a_ap
            drift = adapter_drift(os.path.dirname(ckpt), args.teacher_weights, state["model"])
            rec["adapter_drift"] = drift
            if drift:
                drift_lines.append(
                    f"- `{name}`: cosine(start, trained) / relative change per level: "
                    + ", ".join(f"{lv} {c:.4f} / {r:.3f}" for lv, (c, r) in drift.items())
                )
            rows.append(
                {
                    "model": "teacher head on student FPN, trained adapter",
                    "checkpoint": name,
                    "R^2": r2_text(a_r2),
                    "AP": f"{a_ap['AP']:.2f}",
                }
            )
            # the best any student can do through these adapters: the teacher's own features
            # projected onto what the adapters can output
            image = adapter_image_maps(trained, levels)
            c_r2 = explained_variance(image, teacher, teacher, held_out)
            c_ap = evaluate(
                with_backbone(teacher, swap_backbone(teacher.backbone, image, teacher.backbone)),
                cfg,
                args.dataset,
            )
            rec["adapter_image_R2"], rec["adapter_image_AP"] = c_r2, c_ap
            rows.append(
                {
                    "model": "teacher head on teacher FPN projected onto the adapter's image",
                    "checkpoint": name,
                    "R^2": r2_text(c_r2),
                    "AP": f"{c_ap['AP']:.2f}",
                }
            )
        records.append(rec)

    text = (
        f"### The teacher's head on the student's FPN features ({args.dataset}, COCO bbox AP)\n\n"
        + format_table(rows, ["model", "checkpoint", "R^2", "AP"])
        + f"\n\nR^2: per level ({', '.join(teacher.backbone.output_shape())}), the fraction of the "
        "teacher features' variance the map's output explains, over all locations (over those "
        f"inside a ground-truth box), on {args.fit_images} training images other than the "
        f"{args.fit_images} the least-squares map was fitted on (ridge {args.ridge}). "
        "Projected onto the adapter's image: each location's teacher feature t replaced by "
        "b + A A^+ (t - b), the nearest output of the 1x1 adapter A s + b for any s; its R^2 is "
        "the most of the teacher's variance a student can match through those adapters.\n\n"
        + (
            "The trained adapters against their start (rebuilt from the run's config and seed):\n"
            + "\n".join(drift_lines)
            + "\n\n"
            if drift_lines
            else ""
        )
        + f"Command: `{command_line('benchmarks/head_swap.py')}` "
        f"({(time.time() - start) / 60:.1f} min).\n"
    )
    print(text)
    if args.stem:
        write_results(
            os.path.join(REPO_ROOT, "benchmarks", "results"),
            args.stem,
            text,
            {"records": records, "command": command_line("benchmarks/head_swap.py")},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
