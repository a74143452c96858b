"""Tests of tid_d2.data: the synthetic tid_shapes dataset and --dataset COCO registration."""

import json
import os
import subprocess
import sys
import uuid

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from tid_d2.data import (
    SHAPES_CLASSES,
    ShapesSpec,
    add_dataset_args,
    ensure_generated,
    generate_shapes,
    register_coco_datasets,
    register_tid_shapes,
)
from tid_d2.data import shapes as shapes_mod

SPLITS = ("train", "val", "test")
SMALL = dict(seed=3, sizes=(40, 20, 20), image_size=96)


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    spec = ShapesSpec(root=str(tmp_path_factory.mktemp("shapes_a")), **SMALL)
    return spec, generate_shapes(spec, num_workers=0, progress=False)


# ----------------------------------------------------------------------------------- tid_shapes
def test_layout_and_spec(small):
    spec, paths = small
    assert os.path.basename(spec.dir) == "tid_shapes_s3_n40-20-20_96_standard"
    # "hard" keeps the name of the first generator, whose images it reproduces
    assert ShapesSpec(difficulty="hard", **SMALL).name == "tid_shapes_s3_n40-20-20_96"
    assert set(paths) == set(SPLITS)
    for split in SPLITS:
        json_path, image_root = paths[split]
        assert json_path == os.path.join(spec.dir, f"{split}.json")
        assert image_root == os.path.join(spec.dir, "images", split)
    with pytest.raises(ValueError):
        ShapesSpec(sizes=(3, 20, 20))  # too few images to hold every class
    with pytest.raises(ValueError, match="difficulty"):
        ShapesSpec(difficulty="extreme")


def test_difficulty_sets_clutter():
    """standard draws at most 4 objects per image; hard up to 8 and more of them on average."""
    counts = {}
    for level in ("standard", "hard"):
        n = [len(shapes_mod.render_image(5, 0, i, 96, level)[1]) for i in range(60)]
        counts[level] = n
        assert min(n) >= 1
    assert max(counts["standard"]) <= 4
    assert max(counts["hard"]) > 4
    assert np.mean(counts["hard"]) > np.mean(counts["standard"]) + 1


def test_deterministic_serial_vs_parallel(small, tmp_path):
    spec_a, paths_a = small
    spec_b = ShapesSpec(root=str(tmp_path), **SMALL)
    paths_b = generate_shapes(spec_b, num_workers=2, progress=False)
    for split in SPLITS:
        with open(paths_a[split][0], "rb") as fa, open(paths_b[split][0], "rb") as fb:
            assert fa.read() == fb.read(), split
        names = sorted(os.listdir(paths_a[split][1]))
        assert names == sorted(os.listdir(paths_b[split][1]))
        assert len(names) == spec_a.size(split)
        for name in names:
            a = cv2.imread(os.path.join(paths_a[split][1], name))
            b = cv2.imread(os.path.join(paths_b[split][1], name))
            assert np.array_equal(a, b), (split, name)
    # and the drawing itself is a pure function of (seed, split, index)
    img1, ann1 = shapes_mod.render_image(3, 1, 7, 96)
    img2, ann2 = shapes_mod.render_image(3, 1, 7, 96)
    assert np.array_equal(img1, img2) and ann1 == ann2
    img3, _ = shapes_mod.render_image(3, 2, 7, 96)
    assert not np.array_equal(img1, img3)  # splits differ


def test_coco_content(small):
    spec, paths = small
    for split in SPLITS:
        json_path, image_root = paths[split]
        coco = COCO(json_path)
        assert sorted(coco.getCatIds()) == list(range(1, 7))
        assert [coco.cats[i]["name"] for i in range(1, 7)] == SHAPES_CLASSES
        assert len(coco.getImgIds()) == spec.size(split)
        present = {a["category_id"] for a in coco.dataset["annotations"]}
        assert present == set(range(1, 7)), f"{split}: classes missing"
        for a in coco.dataset["annotations"]:
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert w >= 2 and h >= 2
            assert x >= 0 and y >= 0 and x + w <= spec.image_size and y + h <= spec.image_size
            assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h)
        for img in coco.dataset["images"][:10]:
            pixels = cv2.imread(os.path.join(image_root, img["file_name"]), cv2.IMREAD_COLOR)
            assert pixels is not None
            assert pixels.shape == (img["height"], img["width"], 3)
            assert img["width"] == img["height"] == spec.image_size


def test_registration_lazy_load_and_idempotent(tmp_path):
    prefix = _unique("t_shapes")
    spec = ShapesSpec(root=str(tmp_path), seed=1, sizes=(8, 6, 6), image_size=64)
    names = register_tid_shapes(prefix, spec)
    assert names == [f"{prefix}_{s}" for s in SPLITS]
    assert not os.path.exists(spec.dir)  # lazy: nothing generated at registration
    meta = MetadataCatalog.get(names[1])
    assert meta.thing_classes == SHAPES_CLASSES
    assert meta.evaluator_type == "coco"
    assert meta.json_file == spec.json_path("val")
    assert meta.image_root == spec.image_root("val")

    # same spec again: no-op; a different spec under the same names: error
    assert register_tid_shapes(prefix, ShapesSpec(**{**spec.__dict__})) == names
    with pytest.raises(ValueError, match="already registered"):
        register_tid_shapes(prefix, ShapesSpec(root=str(tmp_path), seed=2, sizes=(8, 6, 6)))

    # ensure_generated makes the split (only that one) exist for COCOEvaluator
    assert ensure_generated(names[2]) is True
    assert os.path.isfile(spec.json_path("test"))
    assert not os.path.exists(spec.json_path("val"))
    assert ensure_generated("not_a_tid_shapes_dataset") is False

    dicts = DatasetCatalog.get(names[1])  # generates val on demand
    assert os.path.isfile(spec.json_path("val"))
    assert len(dicts) == 6
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert d["height"] == d["width"] == 64
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= a["category_id"] < len(SHAPES_CLASSES)  # contiguous ids
            assert len(a["bbox"]) == 4


def test_default_names_registered_without_generating(tmp_path):
    for split in SPLITS:
        assert f"tid_shapes_{split}" in DatasetCatalog.list()
        assert MetadataCatalog.get(f"tid_shapes_{split}").thing_classes == SHAPES_CLASSES
    assert MetadataCatalog.get("tid_shapes_train").json_file == ShapesSpec().resolved().json_path(
        "train"
    )
    code = "import tid_d2.data as d; print(d.DEFAULT_SHAPES_DATASETS)"
    env = dict(os.environ, TID_D2_DATASETS=str(tmp_path / "ds"))
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "tid_shapes_test" in out.stdout
    assert not os.path.exists(tmp_path / "ds")  # nothing generated at import


def test_reimport_and_foreign_name(tmp_path):
    import importlib

    import tid_d2.data

    importlib.reload(tid_d2.data)  # registering the defaults again is a no-op
    name = _unique("plain")
    DatasetCatalog.register(f"{name}_train", lambda: [])
    with pytest.raises(ValueError, match="not as a tid_shapes split"):
        register_tid_shapes(name, ShapesSpec(root=str(tmp_path), sizes=(6, 6, 6)))
    assert f"{name}_val" not in DatasetCatalog.list()  # nothing registered on error


def test_cli_and_preview(tmp_path):
    preview = tmp_path / "preview.png"
    argv = ["--seed", "5", "--sizes", "6", "6", "6", "--image-size", "64", "--root", str(tmp_path)]
    assert shapes_mod.main(argv + ["--preview", str(preview), "--workers", "0"]) == 0
    assert os.path.isfile(tmp_path / "tid_shapes_s5_n6-6-6_64_standard" / "test.json")
    assert shapes_mod.main(argv + ["--difficulty", "hard"]) == 0
    assert os.path.isfile(tmp_path / "tid_shapes_s5_n6-6-6_64" / "test.json")
    grid = cv2.imread(str(preview))
    assert grid is not None and grid.shape[0] > 64 and grid.shape[1] > grid.shape[0]


# --------------------------------------------------------------------------- --dataset COCO
def _tiny_coco(root, n_images=3):
    img_dir = root / "imgs"
    img_dir.mkdir()
    images, annotations = [], []
    for i in range(n_images):
        cv2.imwrite(str(img_dir / f"{i}.jpg"), np.full((32, 48, 3), 40 * i, np.uint8))
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 48, "height": 32})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 7,
                "bbox": [1.0, 2.0, 10.0, 12.0],
                "area": 120.0,
                "iscrowd": 0,
            }
        )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "thing"}, {"id": 9, "name": "other"}],
    }
    json_path = root / "ann.json"
    json_path.write_text(json.dumps(coco))
    return json_path, img_dir, coco


def test_register_coco_valid_and_idempotent(tmp_path):
    json_path, img_dir, _ = _tiny_coco(tmp_path)
    name = _unique("mine")
    spec = f"{name}:{json_path}:{img_dir}"
    assert register_coco_datasets([spec]) == [name]
    meta = MetadataCatalog.get(name)
    assert meta.json_file == str(json_path) and meta.evaluator_type == "coco"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 3 and dicts[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    assert meta.thing_classes == ["thing", "other"]
    assert register_coco_datasets([spec]) == [name]  # same paths again: no-op
    other_json = tmp_path / "copy.json"
    other_json.write_text(json_path.read_text())
    with pytest.raises(ValueError, match="already registered"):
        register_coco_datasets([f"{name}:{other_json}:{img_dir}"])


def test_add_dataset_args():
    import argparse

    parser = add_dataset_args(argparse.ArgumentParser())
    args = parser.parse_args(["--dataset", "a:/x.json:/imgs", "--dataset", "b:/y.json:/i:2"])
    assert args.datasets == ["a:/x.json:/imgs", "b:/y.json:/i:2"]
    assert parser.parse_args([]).datasets == []


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("bad_spec", "expected NAME:ANNOTATION_JSON:IMAGE_ROOT"),
        ("empty_part", "expected NAME:ANNOTATION_JSON:IMAGE_ROOT"),
        ("missing_json", "does not exist"),
        ("malformed_json", r"not valid JSON \(line 2, column"),
        ("missing_field", "has no 'categories' field"),
        ("bad_category", "'category_id' that is not in 'categories'"),
        ("missing_root", "image root .* does not exist"),
        ("missing_image", "1 of 3 image files are missing .*1.jpg"),
    ],
)
def test_register_coco_errors(tmp_path, case, pattern):
    json_path, img_dir, coco = _tiny_coco(tmp_path)
    name = _unique("bad")
    spec = f"{name}:{json_path}:{img_dir}"
    if case == "bad_spec":
        spec = f"{name}-{json_path}"
    elif case == "empty_part":
        spec = f":{json_path}:{img_dir}"
    elif case == "missing_json":
        spec = f"{name}:{tmp_path / 'nope.json'}:{img_dir}"
    elif case == "malformed_json":
        json_path.write_text('{"images": [],\n "annotations" [] }')
    elif case == "missing_field":
        del coco["categories"]
        json_path.write_text(json.dumps(coco))
    elif case == "bad_category":
        coco["annotations"][1]["category_id"] = 8
        json_path.write_text(json.dumps(coco))
    elif case == "missing_root":
        spec = f"{name}:{json_path}:{tmp_path / 'no_such_dir'}"
    elif case == "missing_image":
        os.remove(img_dir / "1.jpg")
    with pytest.raises(ValueError, match=pattern) as info:
        register_coco_datasets([spec])
    if case not in ("bad_spec", "empty_part"):
        assert repr(name) in str(info.value)
        assert name not in DatasetCatalog.list()  # nothing registered on error
