#!/usr/bin/env python
"""Export a deployable student from a TID run: weights (no teacher, no adapters, no optimizer
state) and the student's own detectron2 config, then verify them with ``DefaultPredictor``.

    python tools/export_student.py --config-file configs/shapes/tid_retinanet.yaml \\
        --weights output/shapes/tid_retinanet/model_final.pth --output exported/retinanet_student

A Python (LazyConfig) TID config exports the student's LazyConfig (``model`` = the student node,
``train.init_checkpoint`` = the exported weights), loadable with ``LazyConfig.load``.

Writes ``<output>/model_final.pth`` and ``<output>/config.yaml``. The config holds no TID keys;
a ResNet RetinaNet / Faster R-CNN student loads with plain ``detectron2.config.get_cfg()``,
students that use this project's FCOS or MobileNetV2 need ``import tid_d2`` and
``tid_d2.config.get_cfg()``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# MODEL.<node> of the meta-architectures tid-d2 adds to detectron2 (one per family)
_FAMILY_NODES = ("FCOS", "ATSS", "GFL")


def student_export_cfg(cfg, weights_path: str):
    """The student's config without TID keys (and without project keys it does not use)."""
    from tid_d2.modeling.distiller import student_cfg_from

    scfg = student_cfg_from(cfg)
    scfg.defrost()
    scfg.MODEL.WEIGHTS = weights_path
    del scfg["TID"]
    for node in _FAMILY_NODES:
        if node in scfg.MODEL and scfg.MODEL.META_ARCHITECTURE != node:
            del scfg.MODEL[node]
    if "mobilenet" not in scfg.MODEL.BACKBONE.NAME:
        del scfg.MODEL["MOBILENET"]
    scfg.freeze()
    return scfg


def needs_project(scfg) -> bool:
    return any(node in scfg.MODEL for node in (*_FAMILY_NODES, "MOBILENET"))


def export(config_file: str, weights: str, output: str, image: str = None, opts=()) -> dict:
    """Export and verify; returns {"weights", "config", "max_abs_diff", "num_detections"}."""
    import tid_d2  # noqa: F401
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    from tid_d2.config import get_cfg
    from tid_d2.engine import verification_image, verified_export
    from tid_d2.lazy import is_lazy_config
    from tid_d2.modeling.distiller import is_distiller_key, student_cfg_from
    from tid_d2.modeling.teacher import load_weights_strict, read_checkpoint

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file '{config_file}' does not exist")
    if is_lazy_config(config_file):  # a Python (LazyConfig) TID config: a LazyConfig student
        from tid_d2.lazy_engine import export_lazy_student

        return export_lazy_student(config_file, weights, output, image, opts)
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.META_ARCHITECTURE != "TIDDistiller":
        raise ValueError(
            f"'{config_file}' is not a TID config (MODEL.META_ARCHITECTURE is "
            f"{cfg.MODEL.META_ARCHITECTURE!r}, expected 'TIDDistiller'): pass the config the "
            "student was distilled with."
        )
    cfg.MODEL.DEVICE = "cpu"
    scfg = student_cfg_from(cfg)
    state = read_checkpoint(weights, cfg.TID.ALLOW_PICKLE_WEIGHTS, "student checkpoint")
    # the student alone: no adapters, no imitation-method modules (FGD's GcBlocks)
    student_state = {k: v for k, v in state.items() if not is_distiller_key(k)}

    student = build_model(scfg)
    tmp = os.path.join(output, ".student_check.pth")
    os.makedirs(output, exist_ok=True)
    torch.save({"model": student_state}, tmp)
    try:  # strict: a checkpoint of another architecture fails here, naming the keys
        load_weights_strict(student, tmp, what="student checkpoint")
    finally:
        os.remove(tmp)
    out_weights = os.path.join(output, "model_final.pth")
    torch.save({"model": student.state_dict()}, out_weights + ".tmp")
    os.replace(out_weights + ".tmp", out_weights)
    ecfg = student_export_cfg(cfg, out_weights)
    out_cfg = os.path.join(output, "config.yaml")
    with open(out_cfg, "w") as f:
        f.write(ecfg.dump())

    # Verify: reload the exported files with a fresh config and DefaultPredictor.
    vcfg = get_cfg() if needs_project(ecfg) else d2_get_cfg()
    vcfg.merge_from_file(out_cfg)
    vcfg.MODEL.DEVICE = "cpu"
    predictor = DefaultPredictor(vcfg)
    # a BGR uint8 image: the given file, or the first image of the config's first test set
    img = verification_image(image, cfg.DATASETS.TEST[0] if image is None else None)
    pred = predictor(img)["instances"]
    student.eval()
    with torch.no_grad():
        ref = _predict(student, img, scfg)
    return verified_export(out_weights, out_cfg, pred, ref)


def _predict(model, img_bgr, scfg):
    """The same preprocessing as DefaultPredictor, on the checkpoint-loaded model."""
    import detectron2.data.transforms as T

    img = img_bgr[:, :, ::-1] if scfg.INPUT.FORMAT == "RGB" else img_bgr
    h, w = img.shape[:2]
    aug = T.ResizeShortestEdge([scfg.INPUT.MIN_SIZE_TEST] * 2, scfg.INPUT.MAX_SIZE_TEST)
    img = aug.get_transform(img).apply_image(img)
    tensor = torch.as_tensor(img.astype("float32").transpose(2, 0, 1))
    return model([{"image": tensor, "height": h, "width": w}])[0]["instances"]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="the TID config of the run")
    p.add_argument("--weights", required=True, help="the TID checkpoint (e.g. model_final.pth)")
    p.add_argument("--output", required=True, help="folder for model_final.pth and config.yaml")
    p.add_argument(
        "--image", default=None, help="image for the verification (default: a test image)"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    try:
        res = export(args.config_file, args.weights, args.output, args.image, args.opts)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"export_student: error: {e}", file=sys.stderr)
        return 2
    print(f"exported student weights: {res['weights']}")
    print(f"exported student config:  {res['config']}")
    print(
        f"verified: {res.get('predictor', 'DefaultPredictor')} on the exported files gives "
        f"{res['num_detections']} detections, "
        f"identical to the TID checkpoint's student (max |diff| {res['max_abs_diff']:.2e})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
