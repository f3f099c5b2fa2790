"""Shared fixtures. The shapes dataset is cached under the repository's ``datasets/`` folder
(git-ignored) unless ``DETECTRON2_DATASETS`` says otherwise: it is generated once per checkout."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETECTRON2_DATASETS", str(ROOT / "datasets"))
sys.path.insert(0, str(ROOT))  # train_net.py lives at the repository root

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402

import libra_d2  # noqa: E402  (registers libra_shapes_* under the path set above)

TINY_VAL = "libra_shapes_val_tiny"


@pytest.fixture(scope="session")
def shapes_dataset():
    """``{split: (json_file, image_root)}`` of the generated libra_shapes dataset."""
    return libra_d2.data.ensure_shapes_dataset()


@pytest.fixture(scope="session")
def tiny_val(shapes_dataset, tmp_path_factory):
    """Name of a registered COCO dataset holding the first 12 images of libra_shapes_val."""
    if TINY_VAL not in DatasetCatalog:
        json_file, image_root = shapes_dataset["val"]
        with open(json_file) as f:
            coco = json.load(f)
        keep = {im["id"] for im in coco["images"][:12]}
        coco["images"] = [im for im in coco["images"] if im["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        tiny = tmp_path_factory.mktemp("tiny_val") / "annotations.json"
        tiny.write_text(json.dumps(coco))
        register_coco_instances(TINY_VAL, {}, str(tiny), image_root)
    return TINY_VAL
