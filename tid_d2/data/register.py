"""Register the user's own COCO-format datasets from the command line.

``--dataset NAME:ANNOTATION_JSON:IMAGE_ROOT`` (repeatable) names a dataset, its COCO instances
JSON file and the folder that the JSON's ``file_name`` entries are relative to. Each one is checked
before anything is registered, so a wrong path or a broken file fails at once with a message that
says what to fix, instead of deep inside a data loader later::

    python train_net.py --config-file ... \\
        --dataset mine_train:/data/mine/train.json:/data/mine/images \\
        --dataset mine_val:/data/mine/val.json:/data/mine/images \\
        DATASETS.TRAIN "('mine_train',)" DATASETS.TEST "('mine_val',)"
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence

__all__ = ["register_coco_datasets", "add_dataset_args", "parse_dataset_spec", "DatasetSpec"]

_FORMAT = "NAME:ANNOTATION_JSON:IMAGE_ROOT"
_MAX_EXAMPLES = 5  # offending entries quoted in an error message


@dataclass(frozen=True)
class DatasetSpec:
    """One parsed ``--dataset`` value (paths made absolute)."""

    name: str
    json_file: str
    image_root: str


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse ``NAME:ANNOTATION_JSON:IMAGE_ROOT`` (POSIX paths; the image root may contain ':').

    Raises:
        ValueError: if the string does not have three non-empty parts.
    """
    parts = spec.split(":", 2) if isinstance(spec, str) else []
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(
            f"--dataset {spec!r}: expected {_FORMAT}, three non-empty parts joined by ':' "
            "(e.g. mine_train:/data/mine/train.json:/data/mine/images)"
        )
    name, json_file, image_root = (p.strip() for p in parts)
    return DatasetSpec(
        name,
        os.path.abspath(os.path.expanduser(json_file)),
        os.path.abspath(os.path.expanduser(image_root)),
    )


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_EXAMPLES])
    more = len(items) - _MAX_EXAMPLES
    return shown + (f" (and {more} more)" if more > 0 else "")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _load_json(where: str, path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ValueError(
            f"{where}: annotation file {path} does not exist. "
            f"Check the path in --dataset {_FORMAT}."
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"{where}: annotation file {path} is not a file. "
            "Point --dataset at the COCO JSON file itself, not its folder."
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where}: annotation file {path} is not valid JSON "
            f"(line {e.lineno}, column {e.colno}: {e.msg}). "
            "Fix the file or point --dataset at the right path."
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: annotation file {path} is not UTF-8 text ({e.reason} at byte {e.start}). "
            "Is it really a COCO JSON file? Fix the file or point --dataset at the right path."
        ) from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read annotation file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{where}: annotation file {path} holds a JSON {type(data).__name__}, not an object "
            "with 'images', 'annotations' and 'categories' (COCO instances format)."
        )
    return data


def _check_list_field(where: str, path: str, data: Dict[str, Any], field: str) -> List[Any]:
    if field not in data:
        raise ValueError(
            f"{where}: annotation file {path} has no '{field}' field; a COCO instances file "
            "needs 'images', 'annotations' and 'categories'."
        )
    value = data[field]
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: '{field}' in {path} must be a list, not {type(value).__name__}."
        )
    bad = [f"#{i}" for i, v in enumerate(value) if not isinstance(v, dict)]
    if bad:
        raise ValueError(
            f"{where}: entries {_examples(bad)} of '{field}' in {path} are not objects."
        )
    return value


def _check_categories(where: str, path: str, categories: List[Dict[str, Any]]) -> set:
    if not categories:
        raise ValueError(f"{where}: 'categories' in {path} is empty; list the object classes.")
    bad = [f"#{i}" for i, c in enumerate(categories) if not _is_int(c.get("id")) or "name" not in c]
    if bad:
        raise ValueError(
            f"{where}: categories {_examples(bad)} in {path} need an integer 'id' and a 'name'."
        )
    ids = [c["id"] for c in categories]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(
            f"{where}: category ids {_examples([str(i) for i in dup])} in {path} are not unique."
        )
    return set(ids)


def _check_images(where: str, path: str, images: List[Dict[str, Any]]) -> set:
    if not images:
        raise ValueError(f"{where}: 'images' in {path} is empty; the dataset has no images.")
    bad = []
    for i, im in enumerate(images):
        ok = (
            _is_int(im.get("id"))
            and isinstance(im.get("file_name"), str)
            and im["file_name"] != ""
            and _is_int(im.get("width"))
            and _is_int(im.get("height"))
            and im["width"] > 0
            and im["height"] > 0
        )
        if not ok:
            bad.append(f"#{i}")
    if bad:
        raise ValueError(
            f"{where}: images {_examples(bad)} in {path} need an integer 'id', a 'file_name' and "
            "positive integer 'width' and 'height'."
        )
    ids = [im["id"] for im in images]
    if len(set(ids)) != len(ids):
        seen: set = set()
        dup = sorted({i for i in ids if i in seen or seen.add(i)})
        raise ValueError(
            f"{where}: image ids {_examples([str(i) for i in dup])} in {path} are not unique."
        )
    return set(ids)


def _check_annotations(
    where: str, path: str, annotations: List[Dict[str, Any]], image_ids: set, cat_ids: set
) -> None:
    bad_cat, bad_img, bad_box, ann_ids = [], [], [], []
    for i, a in enumerate(annotations):
        label = f"#{i}" + (f" (id {a['id']})" if "id" in a else "")
        if "id" in a:
            ann_ids.append(a["id"])
        if a.get("category_id") not in cat_ids:
            bad_cat.append(f"{label}: {a.get('category_id')!r}")
        if a.get("image_id") not in image_ids:
            bad_img.append(f"{label}: {a.get('image_id')!r}")
        box = a.get("bbox")
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(_is_number(v) for v in box)
            and box[2] >= 0
            and box[3] >= 0
        ):
            bad_box.append(f"{label}: {box!r}")
    if bad_cat:
        raise ValueError(
            f"{where}: annotations in {path} have a 'category_id' that is not in 'categories' "
            f"(ids {_examples([str(i) for i in sorted(cat_ids)])}): {_examples(bad_cat)}. "
            "Fix the ids or add the missing categories."
        )
    if bad_img:
        raise ValueError(
            f"{where}: annotations in {path} have an 'image_id' that is not in 'images': "
            f"{_examples(bad_img)}."
        )
    if bad_box:
        raise ValueError(
            f"{where}: annotations in {path} need 'bbox' = [x, y, width, height] with 4 finite "
            f"numbers and width, height >= 0: {_examples(bad_box)}."
        )
    if len(set(ann_ids)) != len(ann_ids):
        raise ValueError(f"{where}: annotation ids in {path} are not unique.")


def _check_image_files(where: str, image_root: str, images: List[Dict[str, Any]]) -> None:
    if not os.path.exists(image_root):
        raise ValueError(
            f"{where}: image root {image_root} does not exist. "
            f"Check the last part of --dataset {_FORMAT}."
        )
    if not os.path.isdir(image_root):
        raise ValueError(
            f"{where}: image root {image_root} is not a folder. It must be the folder that the "
            "JSON's 'file_name' entries are relative to."
        )
    missing = [
        im["file_name"]
        for im in images
        if not os.path.isfile(os.path.join(image_root, im["file_name"]))
    ]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} of {len(images)} image files are missing under image root "
            f"{image_root}, e.g. {_examples([os.path.join(image_root, m) for m in missing])}. "
            "The 'file_name' entries of the JSON must be relative to IMAGE_ROOT; fix the "
            "image root or the file names."
        )


def validate_coco_dataset(spec: DatasetSpec) -> None:
    """Check a COCO instances dataset on disk; raise ``ValueError`` naming what to fix."""
    where = f"dataset {spec.name!r}"
    data = _load_json(where, spec.json_file)
    images = _check_list_field(where, spec.json_file, data, "images")
    annotations = _check_list_field(where, spec.json_file, data, "annotations")
    categories = _check_list_field(where, spec.json_file, data, "categories")
    cat_ids = _check_categories(where, spec.json_file, categories)
    image_ids = _check_images(where, spec.json_file, images)
    _check_annotations(where, spec.json_file, annotations, image_ids, cat_ids)
    _check_image_files(where, spec.image_root, images)


def register_coco_datasets(specs: Iterable[str]) -> List[str]:
    """Validate and register COCO datasets given as ``NAME:ANNOTATION_JSON:IMAGE_ROOT``.

    All specs are parsed and checked first (annotation file, its fields, category and image
    ids, the image root and every image file); only then are they registered with
    ``detectron2.data.datasets.register_coco_instances``. A name that is already registered with
    the same paths is left as it is.

    Returns:
        the dataset names, in order.

    Raises:
        ValueError: with a message naming the spec, file or field at fault and what to fix.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    parsed = [parse_dataset_spec(s) for s in (specs or [])]
    seen: Dict[str, DatasetSpec] = {}
    for p in parsed:
        if p.name in seen and seen[p.name] != p:
            raise ValueError(
                f"--dataset name {p.name!r} is given twice with different paths; "
                "use a different NAME for each dataset."
            )
        seen[p.name] = p
    registered = set(DatasetCatalog.list())
    todo = []
    for p in seen.values():
        validate_coco_dataset(p)
        if p.name in registered:
            meta = MetadataCatalog.get(p.name)
            old_json, old_root = meta.get("json_file"), meta.get("image_root")
            same = (
                old_json is not None
                and old_root is not None
                and os.path.abspath(os.fspath(old_json)) == p.json_file
                and os.path.abspath(os.fspath(old_root)) == p.image_root
            )
            if not same:
                raise ValueError(
                    f"--dataset {p.name!r}: a dataset of that name is already registered "
                    f"(annotation file {old_json}, image root {old_root}); choose another NAME."
                )
        else:
            todo.append(p)
    for p in todo:
        register_coco_instances(p.name, {}, p.json_file, p.image_root)
    return [p.name for p in parsed]


def add_dataset_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add a repeatable ``--dataset NAME:ANNOTATION_JSON:IMAGE_ROOT`` option (``args.datasets``,
    a list, empty by default) to ``parser``, e.g. detectron2's ``default_argument_parser()``.

    Pass ``args.datasets`` to :func:`register_coco_datasets` before building the config's
    datasets. Returns ``parser``.
    """
    parser.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        default=[],
        metavar=_FORMAT,
        help="register your own COCO-format dataset: a NAME to use in DATASETS.TRAIN / "
        "DATASETS.TEST, the COCO instances JSON file, and the folder its 'file_name' entries "
        "are relative to, joined by ':' (e.g. mine_train:/data/mine/train.json:/data/mine/images)."
        " Repeat for several datasets. Checked before training starts.",
    )
    return parser
