"""Pre-flight checks that turn common set-up mistakes into one-line errors.

``train_net.py`` runs :func:`preflight` in the launching process, before any worker starts, so a
bad config key, an unregistered dataset, a missing COCO folder, a missing or corrupt
``MODEL.WEIGHTS`` file or a config value that a module rejects is reported as one
:class:`SetupError` line that names the culprit and what to do, instead of a traceback from deep
inside a worker.
"""

import json
import logging
import math
import os
import zipfile

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from .config import add_libra_config
from .data.proposals import check_proposal_files
from .data.shapes import ensure_shapes_dataset, is_shapes_dataset

logger = logging.getLogger(__name__)

# Images of a COCO file whose existence check_coco_json checks, evenly spaced over the file.
_IMAGE_SAMPLE = 20
# What a legacy (non-zip) torch.save file starts with: its magic number, pickled (protocol 2).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


class SetupError(Exception):
    """A user-facing set-up problem; its message is a complete one-line explanation."""


def load_config(config_file, opts=()):
    """
    Build a detectron2 config with the libra_d2 keys, merged from ``config_file`` and ``opts``.

    Raises:
        SetupError: the file is missing, or it or ``opts`` name a key that does not exist.
    """
    cfg = get_cfg()
    add_libra_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise SetupError(f"config file '{config_file}' does not exist")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise SetupError(f"{config_file}: {e.args[0]} (see libra_d2/config.py for libra keys)")
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as e:
        raise SetupError(f"command-line override {list(opts)}: {e.args[0] if e.args else e}")
    return cfg


def check_datasets(cfg):
    """
    Check that every dataset in ``cfg.DATASETS.TRAIN`` / ``TEST`` is registered and that the files
    of COCO-format datasets exist; generate the built-in ``libra_shapes`` splits if needed.

    Raises:
        SetupError: naming the dataset, the missing path and how to fix it.
    """
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(is_shapes_dataset(n) for n in names):
        ensure_shapes_dataset()
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise SetupError(
                f"dataset '{name}' is not registered with detectron2's DatasetCatalog; "
                "register it before training (e.g. register_coco_instances) or use one of "
                "libra_shapes_train/libra_shapes_val or detectron2's builtin names (coco_2017_*)"
            )
        meta = MetadataCatalog.get(name)
        for field in ("json_file", "image_root"):
            path = getattr(meta, field, None)
            if path and not os.path.exists(path):
                raise SetupError(
                    f"dataset '{name}': {field} '{path}' does not exist; put the dataset there "
                    "or set DETECTRON2_DATASETS to the folder that holds it "
                    f"(now: '{os.environ.get('DETECTRON2_DATASETS', 'datasets')}')"
                )
        if getattr(meta, "evaluator_type", None) == "coco" and hasattr(meta, "json_file"):
            check_coco_json(meta.json_file, meta.image_root, name)


def check_coco_json(json_file, image_root, dataset_name):
    """
    Check a COCO instances file before training: every annotation belongs to a listed image and
    category and has a well-formed ``[x, y, w, h]`` box, and the image files of an evenly spaced
    sample of ``_IMAGE_SAMPLE`` images (all of a small file) exist.

    Raises:
        SetupError: naming the file and the first bad entry (image id / annotation id).
    """
    where = f"dataset '{dataset_name}' ({json_file})"
    try:
        with open(json_file) as f:
            coco = json.load(f)
        images, annotations = coco["images"], coco.get("annotations", [])
        category_ids = {c["id"] for c in coco["categories"]}
        image_ids = {im.get("id") for im in images}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SetupError(f"{where}: not a COCO instances file ({type(e).__name__}: {e})")
    for im in images[:: max(1, len(images) // _IMAGE_SAMPLE)]:
        path = os.path.join(image_root, im.get("file_name", ""))
        if not os.path.isfile(path):
            raise SetupError(f"{where}: image id {im.get('id')}: file '{path}' does not exist")
    for ann in annotations:
        entry = f"{where}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        if ann.get("image_id") not in image_ids:
            raise SetupError(f"{entry}: its image_id is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise SetupError(
                f"{entry}: unknown category_id {ann.get('category_id')!r}; "
                f"the file's categories are {sorted(category_ids)}"
            )
        box = ann.get("bbox")
        ok = isinstance(box, (list, tuple)) and len(box) == 4
        ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        if not ok or box[2] < 0 or box[3] < 0:
            raise SetupError(f"{entry}: malformed bbox {box!r}; expected [x, y, w >= 0, h >= 0]")


def check_proposals(cfg):
    """
    With ``MODEL.LOAD_PROPOSALS`` (Fast R-CNN), check that every train/test dataset has a local
    proposal file covering all of its images. Remote files (``detectron2://...``) are left to
    detectron2's loader.

    Raises:
        SetupError: naming the config key or the file and the first image id it lacks.
    """
    files = list(cfg.DATASETS.PROPOSAL_FILES_TRAIN) + list(cfg.DATASETS.PROPOSAL_FILES_TEST)
    if any("://" in f for f in files):
        logger.info("Not checking remote proposal files before training: %s", files)
        return
    try:
        check_proposal_files(cfg)
    except ValueError as e:
        raise SetupError(str(e)) from None


def check_weights(path):
    """
    Check that a local ``MODEL.WEIGHTS`` file exists and looks like a complete checkpoint, from
    its first and last bytes only: a ``.pkl`` must be a pickle (protocol 2 or later, ending with
    the STOP opcode), any other file a ``torch.save`` file (a zip archive with its central
    directory, or the legacy format). Remote URLs (``detectron2://``, ``http(s)://``) are left to
    detectron2's checkpointer, and so is the content (see :class:`LibraCheckpointer`).

    Raises:
        SetupError: the file is missing or unreadable, or is not a checkpoint file.
    """
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise SetupError(f"MODEL.WEIGHTS '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
            f.seek(max(0, os.path.getsize(path) - 1))
            last = f.read(1)
    except OSError as e:
        raise SetupError(f"MODEL.WEIGHTS '{path}' is not a readable checkpoint ({e.strerror})")
    if path.endswith(".pkl"):
        if head[:1] != b"\x80" or last != b".":
            raise SetupError(
                f"MODEL.WEIGHTS '{path}' is not a readable checkpoint: not a complete pickle"
            )
    elif not (head.startswith(_LEGACY_TORCH_MAGIC) or zipfile.is_zipfile(path)):
        raise SetupError(
            f"MODEL.WEIGHTS '{path}' is not a readable checkpoint: not a torch.save file"
        )


def check_model(cfg):
    """
    Build the model on the meta device (structure only: no memory, no initialisation), so that
    the config checks of its modules (``from_config`` and constructors) fail before training.

    Raises:
        SetupError: with the ``ValueError`` of the module that rejected its config.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    try:
        with torch.device("meta"):
            build_model(cfg)
    except ValueError as e:
        raise SetupError(str(e)) from None


def preflight(config_file, opts=()):
    """Run every check above on the config that ``train_net.py`` will use; return that config."""
    cfg = load_config(config_file, opts)
    check_datasets(cfg)
    check_proposals(cfg)
    check_weights(cfg.MODEL.WEIGHTS)
    check_model(cfg)
    return cfg
