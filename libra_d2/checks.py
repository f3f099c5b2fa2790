"""Pre-flight checks that turn common set-up mistakes into one-line errors.

Every entry point (``train_net.py``, ``demo.py``, ``export_model.py``, ``dump_proposals.py``,
``convert_mmdet_checkpoint.py``) runs the checks its job needs in the launching process, before
any worker starts or any model is built: :func:`preflight` for the config-driven ones, the single
checks for the rest. A bad config path or key, an unavailable ``MODEL.DEVICE``, an output folder
that cannot be written, an unregistered or missing dataset, a missing, corrupt or unreachable
``MODEL.WEIGHTS``, or a config value that a module rejects is reported as one :class:`SetupError`
line that names the culprit and what to do, instead of a traceback from deep inside a worker.
"""

import json
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from urllib.parse import urlparse

import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.file_io import Detectron2Handler
from iopath.common.file_io import get_cache_dir
from omegaconf import OmegaConf
from PIL import Image

from .config import add_libra_config
from .data.proposals import check_proposal_files
from .data.shapes import ensure_shapes_dataset, is_shapes_dataset

logger = logging.getLogger(__name__)

# Images of a COCO file whose existence check_coco_json checks, evenly spaced over the file.
_IMAGE_SAMPLE = 20
# What a legacy (non-zip) torch.save file starts with: its magic number, pickled (protocol 2).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
# What OmegaConf.select returns for a key that does not exist.
_MISSING = object()
# Seconds to wait for a weights server to answer before calling it unreachable.
_URL_TIMEOUT_S = 20


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


def is_lazy_config(config_file):
    """Whether ``config_file`` is a LazyConfig (Python) file rather than a YAML one."""
    return config_file.endswith(".py")


def load_lazy_config(config_file, opts=()):
    """
    Load a LazyConfig file and apply ``key=value`` overrides (detectron2's syntax; ``+key=value``
    adds a key, any other key must exist).

    Raises:
        SetupError: the file is missing or fails to load, or an override is malformed or names a
            key that does not exist.
    """
    if not os.path.isfile(config_file):
        raise SetupError(f"config file '{config_file}' does not exist")
    try:
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
    """
    Check that every dataset in ``names`` is registered and that the files of COCO-format datasets
    exist; generate the built-in ``libra_shapes`` splits if needed.

    Raises:
        SetupError: naming the dataset, the missing path and how to fix it.
    """
    if any(is_shapes_dataset(n) for n in names):
        ensure_shapes_dataset()
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
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


def check_proposals(cfg, splits=("TRAIN", "TEST")):
    """
    With ``MODEL.LOAD_PROPOSALS`` (Fast R-CNN), check that every dataset of the ``splits`` of
    ``cfg.DATASETS`` has a local proposal file covering all of its images. Remote files
    (``detectron2://...``) are left to detectron2's loader.

    Raises:
        SetupError: naming the config key or the file and the first image id it lacks.
    """
    files = [f for split in splits for f in cfg.DATASETS[f"PROPOSAL_FILES_{split}"]]
    if any("://" in f for f in files):
        logger.info("Not checking remote proposal files before running: %s", files)
        return
    try:
        check_proposal_files(cfg, splits)
    except ValueError as e:
        raise SetupError(str(e)) from None


def weights_url(path):
    """The http(s) URL that detectron2 downloads ``path`` from (``detectron2://`` names a file
    under ``https://dl.fbaipublicfiles.com/detectron2/``), or ``None`` for other paths."""
    if path.startswith(Detectron2Handler.PREFIX):
        return Detectron2Handler.S3_DETECTRON2_PREFIX + path[len(Detectron2Handler.PREFIX) :]
    return path if path.startswith(("http://", "https://")) else None


def cached_weights_path(url):
    """Where detectron2's downloader (iopath's ``HTTPURLHandler``) keeps the file of ``url``:
    ``<cache>/<URL path>``, ``<cache>`` being ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``."""
    folder = os.path.dirname(urlparse(url).path.lstrip("/"))
    return os.path.join(get_cache_dir(), folder, url.split("/")[-1])


def check_weights(path, what="MODEL.WEIGHTS"):
    """
    Check that the weights ``path`` (the value of the option ``what``) can be loaded:

    * an http(s) or ``detectron2://`` URL is either in detectron2's download cache
      (:func:`cached_weights_path`; then that file is checked, without a network) or answers a
      request for it (the download itself is left to detectron2's checkpointer);
    * a local file exists and looks like a complete checkpoint, from its first and last bytes
      only: a ``.pkl`` must be a pickle (protocol 2 or later, ending with the STOP opcode), any
      other file a ``torch.save`` file (a zip archive with its central directory, or the legacy
      format). The content is left to :class:`LibraCheckpointer`.

    Other remote paths (``catalog://``, ...) are left to detectron2.

    Raises:
        SetupError: the file is missing, unreadable or not a checkpoint file, or the URL is
            neither cached nor reachable (with the reason and the cache path to put it at).
    """
    if not path:
        return
    url = weights_url(path)
    if url:
        file = cached_weights_path(url)
        if not os.path.isfile(file):
            _check_reachable(url, path, what, file)
            return
        label = f"{what} '{path}' (cached as '{file}')"
    elif "://" in path:
        return
    else:
        file, label = path, f"{what} '{path}'"
        if not os.path.isfile(file):
            raise SetupError(f"{label} does not exist")
    try:
        with open(file, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
            f.seek(max(0, os.path.getsize(file) - 1))
            last = f.read(1)
    except OSError as e:
        raise SetupError(f"{label} is not a readable checkpoint ({e.strerror})")
    if file.endswith(".pkl"):
        if head[:1] != b"\x80" or last != b".":
            raise SetupError(f"{label} is not a readable checkpoint: not a complete pickle")
    elif not (head.startswith(_LEGACY_TORCH_MAGIC) or zipfile.is_zipfile(file)):
        raise SetupError(f"{label} is not a readable checkpoint: not a torch.save file")


def _check_reachable(url, path, what, cached):
    """Raise a :class:`SetupError` unless the server of ``url`` answers a GET for it (the body
    is not read); the error names the reason and the offline alternatives."""
    try:
        urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S).close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        # HTTPError: "HTTP Error 404: Not Found"; URLError: its reason (e.g. a DNS error).
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise SetupError(
            f"{what} '{path}' cannot be downloaded ({reason}); download it where there is "
            f"access and give the local file as {what}, or put it at '{cached}' "
            "(detectron2's download cache, moved by FVCORE_CACHE), where it is used offline"
        ) from None


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


def check_device(device, num_processes=1, what="MODEL.DEVICE"):
    """
    Check that ``device`` (the value of the option ``what``) names a device of this machine and,
    where CUDA is available (the workers then use NCCL, one GPU each), that it has
    ``num_processes`` (``--num-gpus``) GPUs.
    Without CUDA, several processes on ``cpu`` are fine (Gloo).

    Raises:
        SetupError: naming the value and what to use instead.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SetupError(f"{what} '{device}' is not a torch device; use cpu or cuda") from None
    gpus = torch.cuda.device_count()
    if dev.type == "cuda" and gpus == 0:
        raise SetupError(
            f"{what} is '{device}' but this machine has no CUDA GPU "
            f"(torch.cuda.is_available() is False); run on the CPU with {what} cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= gpus:
        raise SetupError(
            f"{what} is '{device}' but this machine has {gpus} CUDA GPU(s); "
            f"use cuda:0 to cuda:{gpus - 1}"
        )
    if dev.type not in ("cpu", "cuda", "meta"):
        backend = getattr(torch, dev.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise SetupError(
                f"{what} is '{device}' but torch has no available '{dev.type}' device "
                f"here; use {what} cpu or cuda"
            )
    if torch.cuda.is_available() and num_processes > gpus:
        raise SetupError(
            f"--num-gpus {num_processes} but this machine has {gpus} CUDA GPU(s); "
            f"use --num-gpus {gpus} or fewer"
        )


def check_output_dir(path, what="OUTPUT_DIR"):
    """
    Create the output folder ``path`` (the value of the option ``what``) if needed, as the job
    would, and check that a file can be written in it.

    Raises:
        SetupError: the folder cannot be created or written to (e.g. a file is in the way,
            read-only file system, no permission).
    """
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
    """
    Check that ``path`` is an image file, from its header (PIL).

    Raises:
        SetupError: the file does not exist or is not an image.
    """
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


def preflight(
    config_file,
    opts=(),
    *,
    splits=("TRAIN", "TEST"),
    datasets=(),
    num_processes=1,
    output_dir="OUTPUT_DIR",
):
    """
    Check what one job needs, in this order, and return its config (not frozen): the config
    file and overrides (:func:`load_config`), ``MODEL.DEVICE`` for ``num_processes`` processes,
    the output folder, the datasets the job reads with their proposal files, ``MODEL.WEIGHTS``
    and the model's own config checks (:func:`check_model`).

    Args:
        splits: the lists of ``cfg.DATASETS`` the job reads: ``("TRAIN", "TEST")`` to train,
            ``("TEST",)`` to evaluate. The first one must not be empty.
        datasets: names of further datasets the job reads (e.g. the one it dumps proposals of).
        num_processes: processes per machine (``--num-gpus``).
        output_dir: the option that names the folder the job writes to: ``"OUTPUT_DIR"`` (its
            value is read from the config), or ``(option, folder)``; ``None``: nothing written.

    Raises:
        SetupError: the first problem found, in one line.
    """
    cfg = load_config(config_file, opts)
    check_device(cfg.MODEL.DEVICE, num_processes)
    if output_dir == "OUTPUT_DIR":
        check_output_dir(cfg.OUTPUT_DIR)
    elif output_dir is not None:
        check_output_dir(output_dir[1], output_dir[0])
    if splits and not cfg.DATASETS[splits[0]]:
        raise SetupError(
            f"DATASETS.{splits[0]} is empty; name the datasets to use, e.g. "
            f"DATASETS.{splits[0]} \"('my_dataset',)\""
        )
    check_datasets([name for split in splits for name in cfg.DATASETS[split]] + list(datasets))
    check_proposals(cfg, splits)
    check_weights(cfg.MODEL.WEIGHTS)
    check_model(cfg)
    return cfg


def preflight_lazy(config_file, opts=(), *, eval_only=False, num_processes=1):
    """
    :func:`preflight` for a LazyConfig file of ``train_net.py`` (``model``, ``dataloader``,
    ``train``, and to train ``optimizer`` and ``lr_multiplier``): the file and overrides,
    ``train.device``, ``train.output_dir``, the datasets of ``dataloader.test`` (and
    ``dataloader.train`` unless ``eval_only``), ``train.init_checkpoint`` and the model's own
    config checks (built on the meta device). Returns the config.

    Raises:
        SetupError: the first problem found, in one line.
    """
    cfg = load_lazy_config(config_file, opts)
    splits = ("test",) if eval_only else ("train", "test")
    needed = ["model", "train", *(f"dataloader.{s}" for s in splits)]
    needed += ["dataloader.evaluator"] if eval_only else ["optimizer", "lr_multiplier"]
    for key in needed:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise SetupError(
                f"{config_file} has no '{key}', which train_net.py needs "
                "(see detectron2's configs/common/train.py and configs/COCO-Detection/*.py)"
            )
    check_device(cfg.train.device, num_processes, "train.device")
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    names = [OmegaConf.select(cfg, f"dataloader.{s}.dataset.names") for s in splits]
    check_datasets([n for group in names for n in ([group] if isinstance(group, str) else group)])
    check_weights(cfg.train.init_checkpoint, "train.init_checkpoint")
    try:
        with torch.device("meta"):
            instantiate(cfg.model)
    except ValueError as e:
        raise SetupError(str(e)) from None
    return cfg
