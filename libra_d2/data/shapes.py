"""``libra_shapes``: a small, deterministic, procedurally generated detection dataset.

The dataset exists so that Libra R-CNN can be trained and evaluated end to end without downloading
COCO. It is hard enough to separate a working detector from a broken one:

* 6 classes (:data:`SHAPES_CLASSES`): circle, square, triangle, star, cross (a "plus") and ring,
  drawn with random rotation (squares, triangles, stars, crosses), random colour and an optional
  outline in a second colour.
* Object sizes (the longer side of the tight box) are log-uniform between ``min_size`` (8 px) and
  ``max_size_ratio * image_size`` (112 px for 224 x 224 images), so that most objects are small.
* Objects may overlap. Every annotated object keeps at least ``min_visible`` (60 %) of its pixels
  visible; placements that would hide more of an earlier object are rejected. Boxes are *amodal*:
  the tight box of the full shape, including the part hidden by later objects.
* Backgrounds are textured: a smooth random colour field, an optional sinusoidal grating, and
  pixel noise plus a slight blur over the whole image.
* Clutter that is **not** annotated provides hard negatives: pentagons to octagons, elongated
  ellipses and rectangles, irregular blobs, arcs (ring-like) and line segments, with the same size
  and colour distributions as the objects. Clutter follows the same occlusion rule, and a few thin
  lines are drawn over everything at the end.

Layout on disk, under ``<root>/libra_shapes/<split>/`` where ``root`` defaults to
``$DETECTRON2_DATASETS`` (or ``datasets``)::

    images/000000.png ...   RGB PNG images, image_size x image_size
    annotations.json        COCO instances: info (the generation parameters), images (id from 1,
                            file_name relative to images/, width, height), annotations (bbox
                            [x, y, w, h] in absolute pixels, area = number of pixels of the full
                            shape, iscrowd 0, category_id from 1, segmentation: one polygon of the
                            shape's outline; circles and rings as 32-gons, the hole of a ring is
                            not represented), categories

Image ``i`` of a split is drawn from ``np.random.default_rng([seed, i])`` alone, so the same seed
gives byte-identical files (for a given numpy and Pillow). A split is generated into
``<split>.tmp`` and renamed into place once complete, so a killed generator never leaves a split
that looks complete. Generation holds an exclusive POSIX lock on ``<split>.lock`` (a file that
stays next to the split): any number of processes, on any number of machines sharing the folder
through a filesystem with POSIX locks, may ask for a split at once; one generates it, the others
wait for the lock and reuse the result. The system releases the lock of a process that dies.

:func:`ensure_shapes_dataset` generates (or reuses) the files and :func:`register_libra_shapes`
(called when :mod:`libra_d2.data` is imported) registers ``libra_shapes_train`` and
``libra_shapes_val`` with detectron2.
"""

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "generate_shapes_split",
    "ensure_shapes_dataset",
    "register_libra_shapes",
    "is_shapes_dataset",
]

logger = logging.getLogger(__name__)

SHAPES_CLASSES: List[str] = ["circle", "square", "triangle", "star", "cross", "ring"]

# Generation arguments of each split; the other arguments of generate_shapes_split keep their
# defaults. ensure_shapes_dataset(split_params=...) overrides them.
SHAPES_SPLITS: Dict[str, Dict[str, Any]] = {
    "train": {"num_images": 1200, "seed": 1},
    "val": {"num_images": 200, "seed": 2},
}

_DATASET_DIR = "libra_shapes"
# Recorded in annotations.json; a split of another version is regenerated.
_FORMAT_VERSION = 1
_ANNOTATIONS = "annotations.json"
_IMAGES = "images"
# Placement attempts per object or clutter item before it is skipped.
_PLACEMENT_TRIES = 8
# Minimum RGB distance between an item's colour and the mean colour underneath it.
_MIN_CONTRAST = 60.0

# An item is drawn in a local frame whose origin is placed at an integer image position, so its
# rasterization on the canvas is identical to the mask used for occlusion and the box.
# kind: "polygon" (geom = vertices), "ellipse" / "ring" (geom = (x0, y0, x1, y1), inclusive box;
# ring also has a line width), "arc" (box, start, end, width), "line" (vertices, width).
_Item = Tuple[str, tuple, int, int]


def is_shapes_dataset(name: str) -> bool:
    """Whether ``name`` is one of the ``libra_shapes*`` datasets."""
    return name.startswith("libra_shapes")


def _split_dir(root: Optional[str], split: str) -> str:
    root = root if root is not None else os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.join(root, _DATASET_DIR, split)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _unit_polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a polygon of about unit radius, before rotation and scaling."""
    if kind == "square":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if kind == "triangle":
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if kind == "star":
        angles = np.deg2rad(90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if kind == "cross":
        a = rng.uniform(0.25, 0.4)  # half-width of the arms
        quarter = np.array([[a, -1.0], [a, -a], [1.0, -a]])
        rot90 = np.array([[0.0, -1.0], [1.0, 0.0]])
        return np.concatenate([quarter @ np.linalg.matrix_power(rot90, k).T for k in range(4)])
    if kind == "ngon":
        n = int(rng.integers(5, 9))
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if kind == "ellipse":
        angles = 2 * np.pi * np.arange(32) / 32
        return np.stack([np.cos(angles), rng.uniform(0.2, 0.6) * np.sin(angles)], axis=1)
    if kind == "rectangle":
        h = rng.uniform(0.15, 0.55)
        return np.array([[-1.0, -h], [1.0, -h], [1.0, h], [-1.0, h]])
    if kind == "blob":
        n = int(rng.integers(6, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(0.45, 1.0, n)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"Unknown polygon kind {kind!r}")


def _polygon_item(points: np.ndarray, size: float, rng: np.random.Generator) -> _Item:
    """Rotate ``points`` randomly and scale them so the longer side of their box is ``size``."""
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = points @ rot.T
    points -= points.min(axis=0)
    points *= (size - 1) / points.max()
    points += 1.0  # one pixel of margin for outlines
    return "polygon", tuple(map(tuple, points.tolist())), int(size) + 2, int(size) + 2


def _make_object(cls: str, size: float, rng: np.random.Generator) -> _Item:
    d = int(round(size))
    if cls == "circle":
        return "ellipse", (1, 1, d, d), d + 2, d + 2
    if cls == "ring":
        width = max(2, int(round(d * rng.uniform(0.1, 0.22))))
        return "ring", (1, 1, d, d, width), d + 2, d + 2
    return _polygon_item(_unit_polygon(cls, rng), size, rng)


def _make_clutter(size: float, rng: np.random.Generator) -> _Item:
    kind = rng.choice(["ngon", "ellipse", "rectangle", "blob", "arc", "line"])
    d = int(round(size))
    if kind == "arc":
        start = rng.uniform(0, 360)
        width = max(1, int(round(d * rng.uniform(0.08, 0.2))))
        return "arc", (1, 1, d, d, start, start + rng.uniform(90, 300), width), d + 2, d + 2
    if kind == "line":
        ends = rng.uniform(2, d, size=(2, 2))
        return "line", (tuple(map(tuple, ends.tolist())), int(rng.integers(1, 4))), d + 3, d + 3
    return _polygon_item(_unit_polygon(str(kind), rng), size, rng)


def _draw_item(draw, item: _Item, dx: int, dy: int, fill, outline=None, outline_width=1):
    """Draw ``item`` with its local origin at (dx, dy)."""
    kind, geom = item[0], item[1]
    if kind == "polygon":
        pts = [(x + dx, y + dy) for x, y in geom]
        draw.polygon(pts, fill=fill, outline=outline, width=outline_width)
    elif kind == "ellipse":
        x0, y0, x1, y1 = geom
        box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
        draw.ellipse(box, fill=fill, outline=outline, width=outline_width)
    elif kind == "ring":
        x0, y0, x1, y1, width = geom
        draw.ellipse((x0 + dx, y0 + dy, x1 + dx, y1 + dy), outline=fill, width=width)
    elif kind == "arc":
        x0, y0, x1, y1, start, end, width = geom
        draw.arc((x0 + dx, y0 + dy, x1 + dx, y1 + dy), start, end, fill=fill, width=width)
    else:  # line
        ends, width = geom
        draw.line([(x + dx, y + dy) for x, y in ends], fill=fill, width=width)


def _item_mask(item: _Item, with_outline: bool, outline_width: int) -> np.ndarray:
    """Boolean (h, w) mask of the pixels ``item`` covers in its local frame."""
    mask = Image.new("L", (item[2], item[3]), 0)
    outline = 255 if with_outline else None
    _draw_item(ImageDraw.Draw(mask), item, 0, 0, 255, outline, outline_width)
    return np.asarray(mask) > 0


def _segmentation(item: _Item, dx: int, dy: int) -> List[float]:
    """COCO polygon (pixel-edge coordinates) of an object's outline."""
    if item[0] == "polygon":
        pts = np.array(item[1])
    else:  # circle or ring: 32-gon through the outer edge
        x0, y0, x1, y1 = item[1][:4]
        r = (x1 - x0 + 1) / 2
        angles = 2 * np.pi * np.arange(32) / 32
        pts = np.stack([np.cos(angles), np.sin(angles)], axis=1) * r + [(x0 + x1) / 2] * 2
    pts = pts + [dx + 0.5, dy + 0.5]
    return [round(v, 2) for v in pts.reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------
# Image rendering
# ---------------------------------------------------------------------------------------------


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Float (size, size, 3) textured background in [0, 255]."""
    base = rng.uniform(30, 225, size=3)
    grid = int(rng.integers(2, 9))
    coarse = rng.normal(0, rng.uniform(10, 45), size=(grid, grid, 3))
    coarse = np.clip(coarse + 128, 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    bg = base + (field - 128.0)
    if rng.random() < 0.5:  # sinusoidal grating (stripes)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / rng.uniform(4, 40))
        bg += (rng.uniform(8, 30) * np.sin(phase))[..., None] * rng.uniform(0.3, 1.0, size=3)
    return np.clip(bg, 0, 255)


def _pick_colour(canvas: Image.Image, box, rng: np.random.Generator) -> Tuple[int, int, int]:
    """A random colour that stands out from the mean colour of ``canvas`` inside ``box``."""
    under = np.asarray(canvas.crop(box), np.float32).reshape(-1, 3).mean(axis=0)
    for _ in range(10):
        colour = rng.integers(0, 256, size=3)
        if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
            break
    return tuple(int(c) for c in colour)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _render_image(
    rng: np.random.Generator,
    image_size: int,
    max_objects: int,
    max_clutter: int,
    min_size: float,
    max_size_ratio: float,
    min_visible: float,
) -> Tuple[Image.Image, List[Dict[str, Any]]]:
    """Render one image; returns it and its objects as dicts (category_id, bbox, area, seg)."""
    canvas = Image.fromarray(_background(image_size, rng).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    max_size = max(min_size, max_size_ratio * image_size)

    # Objects (class index >= 0) and clutter (-1), drawn in random order.
    queue = [int(c) for c in rng.integers(0, len(SHAPES_CLASSES), rng.integers(1, max_objects + 1))]
    queue += [-1] * int(rng.integers(0, max_clutter + 1))
    rng.shuffle(queue)

    label = np.zeros((image_size, image_size), np.int32)  # index into `visible` + 1, 0 = none
    visible: List[int] = []  # visible pixels of each placed item
    min_pixels: List[float] = []  # placements may not reduce visible[j] below this
    objects: List[Dict[str, Any]] = []
    for cls in queue:
        size = min(_log_uniform(rng, min_size, max_size), image_size - 3)
        if cls >= 0:
            item = _make_object(SHAPES_CLASSES[cls], size, rng)
        else:
            item = _make_clutter(size, rng)
        outlined = item[0] in ("polygon", "ellipse") and size >= 16 and rng.random() < 0.3
        outline_width = int(rng.integers(1, 3))
        mask = _item_mask(item, outlined, outline_width)
        w, h = item[2], item[3]
        for _ in range(_PLACEMENT_TRIES):
            dx = int(rng.integers(0, image_size - w + 1))
            dy = int(rng.integers(0, image_size - h + 1))
            region = label[dy : dy + h, dx : dx + w]
            hidden = np.bincount(region[mask], minlength=len(visible) + 1)[1:]
            if np.all(np.asarray(visible) - hidden >= np.asarray(min_pixels)):
                break
        else:
            continue
        region[mask] = len(visible) + 1
        visible = [v - int(c) for v, c in zip(visible, hidden)] + [int(mask.sum())]
        min_pixels.append(min_visible * mask.sum() if cls >= 0 else 0.0)

        fill = _pick_colour(canvas, (dx, dy, dx + w, dy + h), rng)
        outline = tuple(int(c) for c in rng.integers(0, 256, size=3)) if outlined else None
        _draw_item(draw, item, dx, dy, fill, outline, outline_width)
        if cls >= 0:
            ys, xs = np.nonzero(mask)
            x0, y0 = dx + int(xs.min()), dy + int(ys.min())
            bw, bh = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
            objects.append(
                {
                    "category_id": cls + 1,
                    "bbox": [x0, y0, bw, bh],
                    "area": int(mask.sum()),
                    "segmentation": [_segmentation(item, dx, dy)],
                }
            )

    for _ in range(int(rng.integers(0, 4))):  # thin lines over everything, ignored by occlusion
        ends = rng.uniform(0, image_size, size=(2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([tuple(p) for p in ends.tolist()], fill=colour, width=1)

    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    noise = rng.standard_normal((image_size, image_size, 1), np.float32) * rng.uniform(1.5, 8)
    pixels = np.asarray(canvas, np.float32) + noise  # luminance noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)), objects


# ---------------------------------------------------------------------------------------------
# Splits on disk
# ---------------------------------------------------------------------------------------------


def _file_name(index: int) -> str:
    return f"{index:06d}.png"


def _render_to_file(image_dir: str, params: Mapping[str, Any], index: int) -> List[Dict]:
    """Render image ``index`` of the split of ``params`` into ``image_dir``; return its objects."""
    kwargs = {k: v for k, v in params.items() if k not in ("num_images", "seed")}
    image, objects = _render_image(np.random.default_rng([params["seed"], index]), **kwargs)
    # Huffman-only deflate: as small as full deflate on these noisy images, and faster.
    path = os.path.join(image_dir, _file_name(index))
    image.save(path, format="PNG", compress_type=zlib.Z_HUFFMAN_ONLY)
    return objects


def _recorded_info(json_file: str) -> Optional[Dict]:
    """The ``info`` of an existing annotations file, or None."""
    try:
        with open(json_file) as f:
            return json.load(f).get("info")
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def _exclusive_lock(lock_file: str):
    """Hold an exclusive POSIX lock (``fcntl.lockf``) on ``lock_file``, created if missing; wait
    for it, with a log line, while another process holds it.

    Raises:
        OSError: naming ``lock_file`` and the way out where its filesystem has no POSIX locks.
    """
    with open(lock_file, "a") as f:
        try:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                logger.info(f"Waiting for another process that holds {lock_file} ...")
                fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as e:
            raise OSError(
                e.errno,
                f"cannot lock {lock_file} ({e.strerror}): generating libra_shapes needs a "
                "filesystem with POSIX locks; generate it there once from a single process "
                "(python -c 'import libra_d2; libra_d2.data.ensure_shapes_dataset()') or set "
                "DETECTRON2_DATASETS to a local folder",
            ) from None
        yield  # closing the file releases the lock


def _write_split(out_dir: str, params: Mapping[str, Any], info: Dict, num_workers: Optional[int]):
    """Generate the split of ``params`` into ``<out_dir>.tmp`` and rename it to ``out_dir``
    (the caller holds the split's lock)."""
    num_images, image_size = params["num_images"], params["image_size"]
    logger.info(f"Generating libra_shapes ({num_images} images) in {out_dir} ...")
    start = time.perf_counter()
    tmp_dir = out_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a generator that was killed
    os.makedirs(os.path.join(tmp_dir, _IMAGES))
    render = functools.partial(_render_to_file, os.path.join(tmp_dir, _IMAGES), params)
    num_workers = num_workers or min(8, os.cpu_count() or 1)
    if num_workers > 1:
        chunksize = max(1, num_images // (4 * num_workers))
        with ProcessPoolExecutor(num_workers) as pool:
            per_image = list(pool.map(render, range(num_images), chunksize=chunksize))
    else:
        per_image = [render(i) for i in range(num_images)]

    images, annotations = [], []
    for i, objects in enumerate(per_image):
        images.append(
            {"id": i + 1, "file_name": _file_name(i), "width": image_size, "height": image_size}
        )
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
    coco = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    with open(os.path.join(tmp_dir, _ANNOTATIONS), "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    with contextlib.suppress(FileNotFoundError):  # an old split is incomplete from here on
        os.remove(os.path.join(out_dir, _ANNOTATIONS))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    logger.info(f"Generated libra_shapes in {out_dir} in {time.perf_counter() - start:.1f} s")


def generate_shapes_split(
    out_dir: str,
    num_images: int,
    seed: int,
    image_size: int = 224,
    max_objects: int = 12,
    max_clutter: int = 10,
    min_size: float = 8.0,
    max_size_ratio: float = 0.5,
    min_visible: float = 0.6,
    num_workers: Optional[int] = None,
) -> str:
    """Make ``out_dir`` hold one split of ``libra_shapes``, generated with these parameters.

    An ``out_dir`` whose ``annotations.json`` records the same parameters is kept as it is.
    Otherwise, holding the lock ``<out_dir>.lock`` (waiting for it, then reusing the split if the
    process that held it generated the same), the split is written into ``<out_dir>.tmp``
    (``annotations.json`` last), then any old ``out_dir`` is removed (its ``annotations.json``
    first) and the new split renamed to ``out_dir``.

    Args:
        out_dir: directory of the split; receives ``images/NNNNNN.png`` and ``annotations.json``.
        num_images: number of images.
        seed: base seed; image ``i`` is drawn from ``np.random.default_rng([seed, i])``.
        image_size: width and height of the (square) images, in pixels.
        max_objects: each image gets between 1 and ``max_objects`` annotated objects before
            placement (objects that cannot be placed without hiding others are skipped).
        max_clutter: each image gets between 0 and ``max_clutter`` unannotated clutter items.
        min_size: smallest object size (longer side of the box), in pixels.
        max_size_ratio: largest object size, as a fraction of ``image_size``.
        min_visible: fraction of each annotated object's pixels that must stay visible.
        num_workers: processes rendering images (default: ``min(8, os.cpu_count())``); does not
            change the output.

    Returns:
        Path of ``out_dir/annotations.json``.
    """
    params = {
        "num_images": num_images,
        "seed": seed,
        "image_size": image_size,
        "max_objects": max_objects,
        "max_clutter": max_clutter,
        "min_size": min_size,
        "max_size_ratio": max_size_ratio,
        "min_visible": min_visible,
    }
    info = {"description": "libra_shapes", "version": _FORMAT_VERSION, "params": params}
    out_dir = os.path.abspath(out_dir)
    json_file = os.path.join(out_dir, _ANNOTATIONS)
    if _recorded_info(json_file) != info:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        with _exclusive_lock(out_dir + ".lock"):
            # Another process may have generated the split while this one waited for the lock.
            if _recorded_info(json_file) != info:
                _write_split(out_dir, params, info, num_workers)
                return json_file
    logger.info(f"Reusing libra_shapes ({num_images} images) in {out_dir}")
    return json_file


def ensure_shapes_dataset(
    root: Optional[str] = None,
    splits: Sequence[str] = ("train", "val"),
    split_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Dict[str, Tuple[str, str]]:
    """Make sure the given splits of ``libra_shapes`` exist on disk (:func:`generate_shapes_split`:
    reused when already generated with the same parameters).

    Args:
        root: datasets root; the dataset lives in ``<root>/libra_shapes/<split>``. Defaults to
            ``$DETECTRON2_DATASETS`` or ``datasets``.
        splits: names of the splits, keys of :data:`SHAPES_SPLITS`.
        split_params: per-split overrides of the :func:`generate_shapes_split` arguments, e.g.
            ``{"train": {"num_images": 100}}``.

    Returns:
        ``{split: (json_file, image_root)}``.
    """
    result = {}
    for split in splits:
        params = {**SHAPES_SPLITS[split], **(split_params or {}).get(split, {})}
        split_dir = _split_dir(root, split)
        generate_shapes_split(split_dir, **params)
        result[split] = (os.path.join(split_dir, _ANNOTATIONS), os.path.join(split_dir, _IMAGES))
    return result


def register_libra_shapes(root: Optional[str] = None) -> None:
    """Register ``libra_shapes_<split>`` for every split in :data:`SHAPES_SPLITS`.

    Only paths are registered (under ``root`` as in :func:`ensure_shapes_dataset`); nothing is
    generated, so call :func:`ensure_shapes_dataset` before loading the datasets. Splits that are
    already registered are left alone.
    """
    for split in SHAPES_SPLITS:
        name = f"libra_shapes_{split}"
        if name in DatasetCatalog:
            continue
        split_dir = _split_dir(root, split)
        MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES))
        register_coco_instances(
            name, {}, os.path.join(split_dir, _ANNOTATIONS), os.path.join(split_dir, _IMAGES)
        )
