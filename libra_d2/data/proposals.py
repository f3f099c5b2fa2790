"""Precomputed proposals for (Libra) Fast R-CNN, in detectron2's proposal-file format.

A proposal file is a pickled dict, read by ``detectron2.data.build.load_proposals_into_dataset``
when ``MODEL.LOAD_PROPOSALS`` is on (``DATASETS.PROPOSAL_FILES_TRAIN`` / ``_TEST``)::

    "ids":               list of image ids, as the ``image_id`` of the dataset dicts
    "boxes":             list of float32 arrays (K_i, 4), XYXY_ABS in original image coordinates
    "objectness_logits": list of float32 arrays (K_i,)
    "bbox_mode":         BoxMode.XYXY_ABS

:func:`generate_proposals` runs a trained model's proposal generator over a test loader,
:func:`save_proposals` writes the file atomically, :func:`check_proposal_file` checks that a file
covers a dataset (detectron2's loader would fail on the first missing image with a bare
``KeyError``). ``dump_proposals.py`` at the repository root ties them together.
"""

import logging
import os
import pickle
import time
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation.evaluator import inference_context
from detectron2.modeling import ProposalNetwork
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_every_n_seconds

from ..checkpoint import atomic_open

__all__ = [
    "check_proposal_model",
    "generate_proposals",
    "merge_proposals",
    "save_proposals",
    "load_proposal_file",
    "check_proposal_file",
    "check_proposal_files",
]

logger = logging.getLogger(__name__)

_KEYS = ("ids", "boxes", "objectness_logits")
# Key names of Detectron1 proposal files, renamed by detectron2's loader.
_D1_KEYS = {"indexes": "ids", "scores": "objectness_logits"}


def _empty_proposals() -> Dict:
    return {"ids": [], "boxes": [], "objectness_logits": [], "bbox_mode": BoxMode.XYXY_ABS}


def check_proposal_model(model) -> None:
    """
    Raise ``ValueError`` unless :func:`generate_proposals` can run ``model``: a detectron2
    ``ProposalNetwork``, or a model with ``preprocess_image``, ``backbone`` and a
    ``proposal_generator`` (e.g. ``GeneralizedRCNN`` with an RPN; not one built with
    ``PrecomputedProposals``, whose ``proposal_generator`` is ``None``).
    """
    if isinstance(model, ProposalNetwork):
        return
    if getattr(model, "proposal_generator", None) is None or not hasattr(model, "preprocess_image"):
        raise ValueError(
            f"{type(model).__name__} has no proposal generator to run: build the model from an "
            "RPN or Faster R-CNN config (MODEL.PROPOSAL_GENERATOR.NAME 'RPN', "
            "MODEL.LOAD_PROPOSALS False)"
        )


def _postprocessed_proposals(model, batched_inputs):
    """
    Proposals of ``model`` for one batch, rescaled to the original image sizes.

    Returns:
        list[Instances]: per image, ``proposal_boxes`` (Boxes (K, 4)) and ``objectness_logits``
        (K,), in the coordinates of the image's ``height`` x ``width``.
    """
    if isinstance(model, ProposalNetwork):
        return [r["proposals"] for r in model(batched_inputs)]  # already postprocessed
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    return [
        detector_postprocess(r, x.get("height", r.image_size[0]), x.get("width", r.image_size[1]))
        for r, x in zip(proposals, batched_inputs)
    ]


def generate_proposals(model, data_loader: Iterable[List[Dict]]) -> Dict:
    """
    Run the proposal generator (RPN) of ``model`` over every image of ``data_loader``.

    The model runs in eval mode (restored afterwards) under ``torch.no_grad()``; boxes are
    rescaled from the network input size to each image's original ``height`` x ``width`` and
    clipped, as detectron2's ``detector_postprocess`` does (empty boxes are dropped).

    Args:
        model: a detectron2 ``ProposalNetwork``, or a model with ``preprocess_image``,
            ``backbone`` and a ``proposal_generator`` (e.g. ``GeneralizedRCNN`` with an RPN).
        data_loader: yields lists of dataset-mapper dicts with ``image``, ``image_id``,
            ``height`` and ``width``, e.g. ``build_detection_test_loader(cfg, dataset_name)``.
            In distributed inference each process sees its shard; see :func:`merge_proposals`.

    Returns:
        dict: in detectron2's proposal-file format (see the module docstring), images in the
        order of the loader; ``boxes`` float32 ``(K, 4)`` XYXY_ABS, ``objectness_logits``
        float32 ``(K,)``.

    Raises:
        ValueError: ``model`` has no proposal generator (see :func:`check_proposal_model`).
    """
    check_proposal_model(model)
    out = _empty_proposals()
    total = len(data_loader) if hasattr(data_loader, "__len__") else None
    start = time.perf_counter()
    with inference_context(model), torch.no_grad():
        for idx, batched_inputs in enumerate(data_loader):
            results = _postprocessed_proposals(model, batched_inputs)
            for x, r in zip(batched_inputs, results):
                out["ids"].append(x["image_id"])
                out["boxes"].append(r.proposal_boxes.tensor.float().cpu().numpy())
                out["objectness_logits"].append(r.objectness_logits.float().cpu().numpy())
            done = idx + 1
            elapsed = time.perf_counter() - start
            log_every_n_seconds(
                logging.INFO,
                f"Proposals: batch {done}/{total if total is not None else '?'}, "
                f"{len(out['ids'])} images, {elapsed / done:.3f} s/batch",
                n=5,
                name=__name__,
            )
    logger.info(
        f"Proposals generated for {len(out['ids'])} images in {time.perf_counter() - start:.1f} s"
    )
    return out


def merge_proposals(parts: Iterable[Optional[Dict]]) -> Dict:
    """
    Concatenate proposal dicts (e.g. the per-process results of distributed inference, gathered
    in rank order) into one; ``None`` parts are skipped.

    Raises:
        ValueError: an image id appears in more than one part.
    """
    out = _empty_proposals()
    for part in parts:
        if part is None:
            continue
        for key in _KEYS:
            out[key].extend(part[key])
    seen = set()
    for image_id in out["ids"]:
        if str(image_id) in seen:
            raise ValueError(f"image id {image_id!r} appears more than once in the proposals")
        seen.add(str(image_id))
    return out


def _validate(proposals: Dict, where: str) -> None:
    """Raise ``ValueError`` (naming ``where``) unless ``proposals`` has the file format."""
    if not isinstance(proposals, dict):
        raise ValueError(f"{where}: expected a dict of proposals, got {type(proposals).__name__}")
    missing = [k for k in _KEYS if k not in proposals]
    if missing:
        raise ValueError(f"{where}: proposals lack the key(s) {missing} (need {list(_KEYS)})")
    lengths = {k: len(proposals[k]) for k in _KEYS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: ids, boxes and objectness_logits differ in length {lengths}")
    for image_id, boxes, logits in zip(*(proposals[k] for k in _KEYS)):
        boxes_shape, logits_shape = np.shape(boxes), np.shape(logits)
        if len(boxes_shape) != 2 or boxes_shape[1] != 4 or logits_shape != boxes_shape[:1]:
            raise ValueError(
                f"{where}: image id {image_id!r} has boxes of shape {boxes_shape} and "
                f"objectness_logits of shape {logits_shape}; expected (K, 4) and (K,)"
            )


def save_proposals(proposals: Dict, path: str) -> None:
    """
    Write ``proposals`` (the dict of :func:`generate_proposals`) to the pickle file ``path``.

    The file is written to a temporary file in the same folder, then renamed over ``path``
    (``os.replace``), so an interrupted write never leaves a truncated proposal file. Parent
    folders are created.

    Raises:
        ValueError: ``proposals`` is not in the proposal-file format.
    """
    _validate(proposals, f"proposals for '{path}'")
    proposals = {"bbox_mode": BoxMode.XYXY_ABS, **proposals}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as f:
        pickle.dump(proposals, f, protocol=pickle.HIGHEST_PROTOCOL)
    logger.info(f"Saved proposals of {len(proposals['ids'])} images to {path}")


def load_proposal_file(path: str) -> Dict:
    """
    Load a proposal file (local path or a URL detectron2's ``PathManager`` can open), renaming
    Detectron1 keys (``indexes``, ``scores``) as detectron2's loader does.

    Raises:
        ValueError: one line naming ``path``: it does not exist, cannot be unpickled, or is not
            in the proposal-file format.
    """
    try:
        with PathManager.open(path, "rb") as f:
            proposals = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise ValueError(f"proposal file '{path}' does not exist") from None
    except Exception as e:  # any failure to read it means the file is unusable
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"proposal file '{path}' is not a readable pickle ({type(e).__name__}: {first_line})"
        ) from None
    if isinstance(proposals, dict):
        for old, new in _D1_KEYS.items():
            if old in proposals and new not in proposals:
                proposals[new] = proposals.pop(old)
    _validate(proposals, f"proposal file '{path}'")
    return proposals


def check_proposal_file(path: str, dataset_name: str) -> int:
    """
    Check that the proposal file ``path`` has proposals for every image of the registered
    dataset ``dataset_name`` (ids compared as strings, as detectron2's loader does).

    Args:
        path (str): a proposal file (see :func:`load_proposal_file`).
        dataset_name (str): a name registered in ``DatasetCatalog``.

    Returns:
        int: the number of images of the dataset (all covered by the file).

    Raises:
        ValueError: one line naming the file: the dataset is not registered, the file is
            unreadable or malformed (see :func:`load_proposal_file`), or it lacks proposals for
            some dataset image (the message names the first one and counts them).
    """
    if dataset_name not in DatasetCatalog:
        raise ValueError(f"dataset '{dataset_name}' (for proposal file '{path}') is not registered")
    proposals = load_proposal_file(path)
    ids = {str(i) for i in proposals["ids"]}
    dataset_dicts = DatasetCatalog.get(dataset_name)
    missing = [d["image_id"] for d in dataset_dicts if str(d["image_id"]) not in ids]
    if missing:
        raise ValueError(
            f"proposal file '{path}' has no proposals for image id {missing[0]!r} of dataset "
            f"'{dataset_name}' ({len(missing)} image(s) of the dataset are missing); regenerate it "
            "for this dataset with dump_proposals.py"
        )
    return len(dataset_dicts)


def check_proposal_files(cfg) -> None:
    """
    When ``cfg.MODEL.LOAD_PROPOSALS`` is on, check that ``DATASETS.PROPOSAL_FILES_TRAIN`` /
    ``_TEST`` give one file per dataset of ``DATASETS.TRAIN`` / ``TEST`` and that every file
    covers its dataset (:func:`check_proposal_file`). Does nothing otherwise.

    Raises:
        ValueError: one line naming the config keys or the file and dataset at fault.
    """
    if not cfg.MODEL.LOAD_PROPOSALS:
        return
    for split in ("TRAIN", "TEST"):
        names = list(cfg.DATASETS[split])
        files = list(cfg.DATASETS[f"PROPOSAL_FILES_{split}"])
        if len(files) != len(names):
            raise ValueError(
                f"MODEL.LOAD_PROPOSALS is True but DATASETS.PROPOSAL_FILES_{split} has "
                f"{len(files)} file(s) for the {len(names)} dataset(s) of DATASETS.{split} "
                f"{tuple(names)}; give one proposal file per dataset (see dump_proposals.py)"
            )
        for name, path in zip(names, files):
            check_proposal_file(path, name)
