"""Tests of the built-in ``libra_shapes`` dataset (libra_d2/data/shapes.py)."""

import errno
import fcntl
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from libra_d2.data import shapes
from libra_d2.data.shapes import (
    SHAPES_CLASSES,
    ensure_shapes_dataset,
    generate_shapes_split,
    is_shapes_dataset,
    register_libra_shapes,
)

SMALL = {"train": {"num_images": 6}, "val": {"num_images": 4}}


def _read_all(split_dir):
    """{relative path: bytes} of every file of a split."""
    paths = glob.glob(os.path.join(split_dir, "**", "*"), recursive=True)
    return {os.path.relpath(p, split_dir): open(p, "rb").read() for p in paths if os.path.isfile(p)}


def _digest(files):
    return hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()


def _mtimes(split_dir):
    paths = glob.glob(os.path.join(split_dir, "**", "*"), recursive=True)
    return {p: os.stat(p).st_mtime_ns for p in paths}


def _forbid_rendering(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached split should have been reused")

    monkeypatch.setattr(shapes, "_render_to_file", fail)


def test_same_seed_gives_identical_files(tmp_path):
    a = _read_all(os.path.dirname(generate_shapes_split(str(tmp_path / "a"), 6, seed=3)))
    b_json = generate_shapes_split(str(tmp_path / "b"), 6, seed=3, num_workers=2)
    b = _read_all(os.path.dirname(b_json))
    c = _read_all(os.path.dirname(generate_shapes_split(str(tmp_path / "c"), 6, seed=4)))

    assert len(a) == 6 + 1  # images, annotations.json
    assert a == b  # also independent of the number of worker processes
    assert a.keys() == c.keys()
    assert a["annotations.json"] != c["annotations.json"]
    images = [name for name in a if name.endswith(".png")]
    assert all(a[name] != c[name] for name in images)
    assert len({a[name] for name in images}) == len(images)  # images differ from each other


def test_annotations_are_sane_and_load_with_detectron2(tmp_path):
    from detectron2.data.datasets import load_coco_json

    size = 224
    json_file = generate_shapes_split(str(tmp_path / "s"), 12, seed=5, image_size=size)
    coco = json.load(open(json_file))
    assert [c["name"] for c in coco["categories"]] == SHAPES_CLASSES
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(SHAPES_CLASSES) + 1))
    assert [im["id"] for im in coco["images"]] == list(range(1, 13))
    for im in coco["images"]:
        with Image.open(os.path.join(tmp_path, "s", "images", im["file_name"])) as image:
            assert image.size == (im["width"], im["height"]) == (size, size)
            assert image.mode == "RGB"

    anns = coco["annotations"]
    assert len(anns) >= 2 * len(coco["images"])
    assert len({a["id"] for a in anns}) == len(anns)
    assert len({a["category_id"] for a in anns}) >= 4
    longest = []
    for a in anns:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= size and y + h <= size
        assert 0 < a["area"] <= w * h
        poly = np.array(a["segmentation"][0]).reshape(-1, 2)
        assert np.all(poly.min(axis=0) >= [x - 1, y - 1])
        assert np.all(poly.max(axis=0) <= [x + w + 1, y + h + 1])
        longest.append(max(w, h))
    assert min(longest) < 16 and max(longest) >= 0.3 * size  # small to large objects

    dicts = load_coco_json(json_file, str(tmp_path / "s" / "images"))
    assert len(dicts) == 12
    assert sum(len(d["annotations"]) for d in dicts) == len(anns)
    assert all(os.path.isfile(d["file_name"]) for d in dicts)


def test_ensure_uses_detectron2_datasets_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    paths = ensure_shapes_dataset(split_params=SMALL)
    assert set(paths) == {"train", "val"}
    for split, (json_file, image_root) in paths.items():
        assert json_file == str(tmp_path / "libra_shapes" / split / "annotations.json")
        assert image_root == str(tmp_path / "libra_shapes" / split / "images")
        coco = json.load(open(json_file))
        assert len(coco["images"]) == SMALL[split]["num_images"]
        assert coco["info"]["params"]["num_images"] == SMALL[split]["num_images"]
    mtimes = _mtimes(str(tmp_path / "libra_shapes"))

    _forbid_rendering(monkeypatch)
    time.sleep(0.01)
    assert ensure_shapes_dataset(split_params=SMALL) == paths
    assert _mtimes(str(tmp_path / "libra_shapes")) == mtimes


def _delete_annotations(split_dir):
    os.remove(os.path.join(split_dir, "annotations.json"))


def _truncate_annotations(split_dir):
    path = os.path.join(split_dir, "annotations.json")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _other_version(split_dir):
    path = os.path.join(split_dir, "annotations.json")
    coco = json.load(open(path))
    coco["info"]["version"] = 0
    with open(path, "w") as f:
        json.dump(coco, f)


@pytest.mark.parametrize("damage", [_delete_annotations, _truncate_annotations, _other_version])
def test_incomplete_or_outdated_split_is_rebuilt(tmp_path, damage):
    reference = _read_all(os.path.dirname(generate_shapes_split(str(tmp_path / "ref"), 6, seed=1)))
    root = str(tmp_path / "root")
    split_dir = os.path.join(root, "libra_shapes", "train")
    ensure_shapes_dataset(root, splits=("train",), split_params=SMALL)
    assert _read_all(split_dir) == reference
    damage(split_dir)
    ensure_shapes_dataset(root, splits=("train",), split_params=SMALL)
    assert _read_all(split_dir) == reference
    assert sorted(os.listdir(os.path.dirname(split_dir))) == ["train", "train.lock"]  # no .tmp


def test_split_with_other_parameters_is_replaced(tmp_path):
    root = str(tmp_path)
    ensure_shapes_dataset(root, splits=("val",), split_params=SMALL)
    json_file, _ = ensure_shapes_dataset(root, ("val",), {"val": {"num_images": 5}})["val"]
    assert len(json.load(open(json_file))["images"]) == 5
    json_file, image_root = ensure_shapes_dataset(root, ("val",), {"val": {"num_images": 3}})["val"]
    assert len(json.load(open(json_file))["images"]) == 3
    assert sorted(os.listdir(image_root)) == ["000000.png", "000001.png", "000002.png"]
    assert sorted(os.listdir(tmp_path / "libra_shapes")) == ["val", "val.lock"]


def test_interrupted_replacement_is_not_taken_for_complete(tmp_path, monkeypatch):
    """A generator killed while it removes an old split (of other parameters) leaves no split
    that looks complete to a later run with the old parameters."""
    root = str(tmp_path / "root")
    split_dir = os.path.join(root, "libra_shapes", "val")
    reference = _read_all(os.path.dirname(ensure_shapes_dataset(root, ("val",), SMALL)["val"][0]))
    rmtree = shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        if path == split_dir:  # killed after deleting one image of the old split
            os.remove(os.path.join(split_dir, "images", "000000.png"))
            raise KeyboardInterrupt
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset(root, ("val",), {"val": {"num_images": 5}})
    monkeypatch.undo()
    ensure_shapes_dataset(root, ("val",), SMALL)
    assert _read_all(split_dir) == reference


CONCURRENT = {"train": {"num_images": 8, "num_workers": 1}}


def _ensure_together(barrier, root, log_file):
    """Log libra_d2's dataset messages to ``log_file``, wait at ``barrier``, ensure the split of
    :data:`CONCURRENT`, then log a digest of the files it found."""
    shapes.logger.setLevel(logging.INFO)
    shapes.logger.addHandler(logging.FileHandler(log_file))
    barrier.wait()
    json_file, _ = ensure_shapes_dataset(root, ("train",), CONCURRENT)["train"]
    shapes.logger.info(f"files {_digest(_read_all(os.path.dirname(json_file)))}")


def test_processes_started_together_generate_once(tmp_path):
    """4 processes ask for the same split of an empty folder at the same instant: one generates
    it, the others wait for its lock and reuse it; all see the same complete split."""
    root = tmp_path / "root"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    logs = [tmp_path / f"log{i}.txt" for i in range(4)]
    procs = [ctx.Process(target=_ensure_together, args=(barrier, str(root), log)) for log in logs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * 4

    lines = [line for log in logs for line in log.read_text().splitlines()]
    assert sum(line.startswith("Generating libra_shapes") for line in lines) == 1
    assert sum(line.startswith("Reusing libra_shapes") for line in lines) == 3
    assert sum(line.startswith("Waiting for another process") for line in lines) >= 1
    reference = _read_all(os.path.dirname(generate_shapes_split(str(tmp_path / "ref"), 8, 1)))
    assert {line for line in lines if line.startswith("files ")} == {f"files {_digest(reference)}"}
    assert sorted(os.listdir(root / "libra_shapes")) == ["train", "train.lock"]


def test_killed_generation_leaves_no_split_and_is_rebuilt(tmp_path, monkeypatch):
    split_dir = str(tmp_path / "libra_shapes" / "train")
    ctx = multiprocessing.get_context("fork")
    kwargs = {"num_workers": 1}  # no orphaned worker processes once the generator is killed
    proc = ctx.Process(target=generate_shapes_split, args=(split_dir, 1000, 1), kwargs=kwargs)
    proc.start()
    deadline = time.time() + 60
    while len(glob.glob(split_dir + ".tmp/images/*.png")) < 3 and time.time() < deadline:
        assert proc.is_alive()
        time.sleep(0.02)
    with open(split_dir + ".lock", "a") as f, pytest.raises(BlockingIOError):
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the generator holds the split's lock
    proc.kill()
    proc.join()
    assert glob.glob(split_dir + ".tmp/images/*.png"), "generation did not start"
    assert not os.path.exists(split_dir)  # only complete splits are moved into place

    # The same happens if an older, non-atomic writer left a half-written split in place.
    os.makedirs(os.path.join(split_dir, "images"))
    Image.new("RGB", (224, 224)).save(os.path.join(split_dir, "images", "000000.png"))
    # The killed generator's lock died with it: the next process gets it, in another process so
    # that a lock that outlived its holder fails the test instead of hanging it.
    follower = ctx.Process(target=ensure_shapes_dataset, args=(str(tmp_path), ("train",), SMALL))
    follower.start()
    follower.join(60)
    if follower.is_alive():
        follower.kill()
    assert follower.exitcode == 0
    _forbid_rendering(monkeypatch)  # the follower rebuilt the split
    json_file, image_root = ensure_shapes_dataset(str(tmp_path), ("train",), SMALL)["train"]
    assert len(json.load(open(json_file))["images"]) == 6
    assert len(os.listdir(image_root)) == 6
    assert sorted(os.listdir(tmp_path / "libra_shapes")) == ["train", "train.lock"]  # .tmp gone


def test_filesystem_without_locks_is_named(tmp_path, monkeypatch):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock_file = tmp_path / "libra_shapes" / "val.lock"
    with pytest.raises(OSError, match=f"cannot lock {lock_file} .*DETECTRON2_DATASETS") as e:
        ensure_shapes_dataset(str(tmp_path), ("val",), SMALL)
    assert e.value.errno == errno.ENOLCK
    assert not (tmp_path / "libra_shapes" / "val").exists()


def test_registration(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    import libra_d2.data  # noqa: F401  (registers the datasets)

    for split in ("train", "val"):
        name = f"libra_shapes_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == SHAPES_CLASSES
        assert meta.json_file.endswith(os.path.join("libra_shapes", split, "annotations.json"))
    register_libra_shapes()  # idempotent

    # Loading a generated split under the registered name agrees with the preset thing_classes.
    json_file, image_root = ensure_shapes_dataset(str(tmp_path), ("val",), SMALL)["val"]
    dicts = load_coco_json(json_file, image_root, "libra_shapes_val")
    assert len(dicts) == 4
    assert MetadataCatalog.get("libra_shapes_val").thing_dataset_id_to_contiguous_id == {
        i + 1: i for i in range(len(SHAPES_CLASSES))
    }


def test_is_shapes_dataset():
    assert is_shapes_dataset("libra_shapes_train") and is_shapes_dataset("libra_shapes_val")
    assert not is_shapes_dataset("coco_2017_val")
