"""Pre-flight checks: set-up mistakes as one-line :class:`SetupError` messages.

Each entry point calls the checks its job needs in the launching process, before any worker starts,
and exits with argparse's status 2 on a :class:`SetupError`. Only what detectron2, fvcore and
iopath do not report in one line themselves is checked.
"""

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import urllib.error
import warnings

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import get_cache_dir
from omegaconf import OmegaConf
from PIL import Image

from .checkpoint import safe_load_pickle
from .config import add_libra_config
from .data.proposals import check_proposal_files
from .data.shapes import ensure_shapes_dataset, is_shapes_dataset

logger = logging.getLogger(__name__)

# COCO files up to this size are checked entry by entry; larger ones (COCO train: ~450 MB) are
# left to detectron2's loader, so that no large file is loaded twice.
_COCO_CHECK_MAX_BYTES = 64 << 20
# Images of a COCO file whose existence check_coco_json checks, evenly spaced over the file.
_IMAGE_SAMPLE = 20
# What OmegaConf.select returns for a key that does not exist.
_MISSING = object()


class SetupError(Exception):
    """A user-facing set-up problem; its message is a complete one-line explanation."""


def load_config(config_file, opts=()):
    """detectron2's config with the libra_d2 keys, merged from ``config_file`` and ``opts``;
    SetupError if the file is missing or it or ``opts`` name a key that does not exist."""
    cfg = add_libra_config(get_cfg())
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


def is_lazy_config(config_file):
    """Whether ``config_file`` is a LazyConfig (Python) file rather than a YAML one."""
    return config_file.endswith(".py")


def load_lazy_config(config_file, opts=()):
    """A LazyConfig file with ``key=value`` overrides (detectron2's syntax; ``+key=value`` adds a
    key, any other key must exist); SetupError if the file is missing or fails to load, or an
    override is malformed or names a key that does not exist."""
    if not os.path.isfile(config_file):
        raise SetupError(f"config file '{config_file}' does not exist")
    try:
        with warnings.catch_warnings():  # detectron2's model_zoo imports pkg_resources
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            cfg = LazyConfig.load(config_file)
    except Exception as e:  # a Python file: anything can go wrong in it
        raise SetupError(f"config file '{config_file}' fails to load ({type(e).__name__}: {e})")
    for override in opts:
        key = override.split("=", 1)[0]
        if "=" not in override:
            raise SetupError(f"command-line override '{override}' is not of the form key=value")
        if not key.startswith("+") and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise SetupError(
                f"command-line override '{override}': {config_file} has no key '{key}' "
                f"(write '+{key}=...' to add one)"
            )
    try:
        return LazyConfig.apply_overrides(cfg, list(opts))
    except Exception as e:
        raise SetupError(f"command-line overrides {list(opts)}: {type(e).__name__}: {e}") from None


def check_datasets(names):
    """Check that the datasets ``names`` are registered, that their files exist and the entries
    of their COCO files (:func:`check_coco_json`); generate ``libra_shapes`` if needed."""
    if any(is_shapes_dataset(n) for n in names):
        ensure_shapes_dataset()
    for name in names:
        if name not in DatasetCatalog:
            raise SetupError(
                f"dataset '{name}' is not registered with detectron2's DatasetCatalog; "
                "register it before running (e.g. register_coco_instances) or use one of "
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
        if meta.get("evaluator_type") == "coco" and meta.get("json_file"):
            if os.path.getsize(meta.json_file) <= _COCO_CHECK_MAX_BYTES:
                check_coco_json(meta.json_file, meta.image_root, name)


def check_coco_json(json_file, image_root, dataset_name):
    """Check a COCO instances file: every annotation has a listed image and category and a
    well-formed ``[x, y, w, h]`` box, and the image files of an evenly spaced sample of
    ``_IMAGE_SAMPLE`` images exist. SetupError names the file and the first bad entry."""
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


def check_proposals(cfg, splits):
    """With ``MODEL.LOAD_PROPOSALS``, check that every dataset of the ``splits`` of
    ``cfg.DATASETS`` (e.g. ``("TRAIN",)``) has a local proposal file covering all of its images
    (:func:`check_proposal_files`); remote files are left to detectron2's loader."""
    files = [f for split in splits for f in cfg.DATASETS[f"PROPOSAL_FILES_{split}"]]
    if any("://" in f for f in files):
        logger.info("Not checking remote proposal files before running: %s", files)
        return
    try:
        check_proposal_files(cfg, splits)
    except ValueError as e:
        raise SetupError(str(e)) from None


def fetch_weights(path, what="MODEL.WEIGHTS"):
    """The local file of the weights ``path`` (the value of the option ``what``), through
    detectron2's ``PathManager``, which downloads a URL once into iopath's cache (where the
    workers find it; a cached file needs no network)."""
    iopath_logger = logging.getLogger("iopath")
    level = iopath_logger.level
    try:  # quiet: iopath logs a failed download, and draws its progress on stderr
        iopath_logger.setLevel(logging.CRITICAL)
        with contextlib.redirect_stderr(io.StringIO()):
            local = PathManager.get_local_path(path)
    except (OSError, ValueError) as e:  # urllib.error.URLError is an OSError
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise SetupError(
            f"{what} '{path}' cannot be downloaded ({reason}); download it where there is "
            f"access and give the local file as {what}, or put it in iopath's download cache "
            f"'{get_cache_dir()}' (moved by FVCORE_CACHE) under the URL's path, where it is "
            "used offline"
        ) from None
    finally:
        iopath_logger.setLevel(level)
    label = f"{what} '{path}'" + (f" (cached as '{local}')" if local != path else "")
    if not os.path.isfile(local):
        raise SetupError(f"{label} does not exist")
    if local != path:
        logger.info(f"{what} '{path}' is '{local}'")
    return local


def check_weights(path, what="MODEL.WEIGHTS"):
    """:func:`fetch_weights`, then load them (``.pkl``: :func:`safe_load_pickle`, others:
    ``torch.load(weights_only=True)``); returns the local path (``""`` for no weights)."""
    if not path:
        return ""
    local = fetch_weights(path, what)
    label = f"{what} '{path}'" + (f" (cached as '{local}')" if local != path else "")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before failing
            warnings.simplefilter("ignore")
            if local.endswith(".pkl"):
                safe_load_pickle(local)
            else:
                torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many types for a truncated or foreign file
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""  # torch's are long
        raise SetupError(
            f"{label} is not a readable checkpoint ({type(e).__name__}: {first})"
        ) from None
    return local


def check_model(cfg):
    """Build the model of ``cfg`` (a YAML config, or a LazyConfig's ``model``) on the meta device
    (no memory, no initialisation), so that a ``ValueError`` of a module that rejects its config
    is raised now, as a SetupError."""
    try:
        with torch.device("meta"):
            if isinstance(cfg, CfgNode):
                cfg = cfg.clone()
                cfg.defrost()
                cfg.MODEL.DEVICE = "meta"
                build_model(cfg)
            else:
                instantiate(cfg.model)
    except ValueError as e:
        raise SetupError(str(e)) from None


def check_device(device, num_processes=1, what="MODEL.DEVICE"):
    """Check that ``device`` (the value of the option ``what``) is available here and, with CUDA
    (one GPU per process, NCCL), that there are ``num_processes`` (``--num-gpus``) GPUs; several
    processes on ``cpu`` use Gloo."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SetupError(f"{what} '{device}' is not a torch device; use cpu or cuda") from None
    backend = getattr(torch, dev.type, None)
    if dev.type not in ("cpu", "meta") and not getattr(backend, "is_available", bool)():
        raise SetupError(
            f"{what} is '{device}' but this machine has no {dev.type} device "
            f"(torch.{dev.type}.is_available() is False); run on the CPU with {what} cpu"
        )
    gpus = torch.cuda.device_count()
    if dev.type == "cuda" and dev.index is not None and dev.index >= gpus:
        raise SetupError(
            f"{what} is '{device}' but this machine has {gpus} CUDA GPU(s); "
            f"use cuda:0 to cuda:{gpus - 1}"
        )
    if torch.cuda.is_available() and num_processes > gpus:
        raise SetupError(
            f"--num-gpus {num_processes} but this machine has {gpus} CUDA GPU(s); "
            f"use --num-gpus {gpus} or fewer"
        )


def check_output_dir(path, what="OUTPUT_DIR"):
    """Create the folder ``path`` (the value of the option ``what``) if needed, as the job would,
    and check that a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SetupError(
            f"{what} '{path}' cannot be created or written to ({e.strerror}); "
            "point it to a writable folder"
        ) from None


def check_image(path):
    """Check that ``path`` is an image file, from its header (PIL)."""
    if os.path.isdir(path):
        raise SetupError(
            f"'{path}' is a folder; give image files, or a pattern like 'folder/*.jpg'"
        )
    if not os.path.isfile(path):
        raise SetupError(f"image '{path}' does not exist; check the path (quote glob patterns)")
    try:
        Image.open(path).close()
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise SetupError(
            f"'{path}' is not a readable image file ({type(e).__name__}); give a JPEG or PNG file"
        ) from None
