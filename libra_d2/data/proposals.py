"""Precomputed proposals for (Libra) Fast R-CNN, in detectron2's proposal-file format.

A proposal file is a pickled dict, read by ``detectron2.data.build.load_proposals_into_dataset``
when ``MODEL.LOAD_PROPOSALS`` is on (``DATASETS.PROPOSAL_FILES_TRAIN`` / ``_TEST``)::

    "ids":               list of image ids, as the ``image_id`` of the dataset dicts
    "boxes":             list of float32 arrays (K_i, 4), XYXY_ABS in original image coordinates
    "objectness_logits": list of float32 arrays (K_i,)
    "bbox_mode":         BoxMode.XYXY_ABS

``dump_proposals.py`` writes one (:func:`generate_proposals`, :func:`merge_proposals`,
:func:`save_proposals`); the pre-flight checks that the files cover their datasets
(:func:`check_proposal_files`), where detectron2's loader would stop at the first missing image
with a bare ``KeyError``.
"""

import logging
import os
import pickle

import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation.evaluator import inference_context
from detectron2.modeling import ProposalNetwork
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_every_n_seconds

from ..files import atomic_open

__all__ = [
    "generate_proposals",
    "merge_proposals",
    "save_proposals",
    "check_proposal_file",
    "check_proposal_files",
]

logger = logging.getLogger(__name__)

_KEYS = ("ids", "boxes", "objectness_logits")


def _proposals(model, batched_inputs):
    """Proposals (``Instances``) of one batch, in the original image coordinates."""
    if isinstance(model, ProposalNetwork):
        return [r["proposals"] for r in model(batched_inputs)]  # already postprocessed
    images = model.preprocess_image(batched_inputs)
    proposals, _ = model.proposal_generator(images, model.backbone(images.tensor), None)
    return [
        detector_postprocess(r, x.get("height", r.image_size[0]), x.get("width", r.image_size[1]))
        for r, x in zip(proposals, batched_inputs)
    ]


def generate_proposals(model, data_loader):
    """
    Run the proposal generator (RPN) of ``model`` over every image of ``data_loader``, in eval
    mode (restored afterwards) and without gradients. Boxes are rescaled from the network input
    to each image's original ``height`` x ``width`` and clipped, as detectron2's
    ``detector_postprocess`` does (empty boxes are dropped).

    Args:
        model: a detectron2 ``ProposalNetwork``, or a ``GeneralizedRCNN`` with a proposal
            generator.
        data_loader: yields lists of dataset-mapper dicts with ``image``, ``image_id``,
            ``height`` and ``width``, e.g. ``build_detection_test_loader(cfg, dataset_name)``.
            In distributed inference each process sees its shard (see :func:`merge_proposals`).

    Returns:
        dict: a proposal file's content (module docstring), images in the loader's order.

    Raises:
        ValueError: ``model`` has no proposal generator (e.g. built with
            ``PrecomputedProposals``, or a RetinaNet).
    """
    if getattr(model, "proposal_generator", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no proposal generator to run: build the model from an "
            "RPN or Faster R-CNN config (MODEL.PROPOSAL_GENERATOR.NAME 'RPN', "
            "MODEL.LOAD_PROPOSALS False)"
        )
    out = {"ids": [], "boxes": [], "objectness_logits": [], "bbox_mode": BoxMode.XYXY_ABS}
    with inference_context(model), torch.no_grad():
        for batched_inputs in data_loader:
            for x, r in zip(batched_inputs, _proposals(model, batched_inputs)):
                out["ids"].append(x["image_id"])
                out["boxes"].append(r.proposal_boxes.tensor.float().cpu().numpy())
                out["objectness_logits"].append(r.objectness_logits.float().cpu().numpy())
            n = len(out["ids"])
            log_every_n_seconds(logging.INFO, f"Proposals of {n} images", n=10, name=__name__)
    return out


def merge_proposals(parts):
    """
    Concatenate proposal dicts, e.g. the per-process results of distributed inference gathered
    in rank order.

    Raises:
        ValueError: an image id appears in more than one part.
    """
    out = {"ids": [], "boxes": [], "objectness_logits": [], "bbox_mode": BoxMode.XYXY_ABS}
    for part in parts:
        for key in _KEYS:
            out[key].extend(part[key])
    if len({str(i) for i in out["ids"]}) != len(out["ids"]):
        raise ValueError("an image id appears more than once in the proposals")
    return out


def save_proposals(proposals, path):
    """
    Write ``proposals`` (the dict of :func:`generate_proposals`) to the pickle file ``path``,
    atomically (a temporary file renamed over ``path``: an interrupted write never leaves a
    truncated file). Parent folders are created.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as f:
        pickle.dump({"bbox_mode": BoxMode.XYXY_ABS, **proposals}, f, pickle.HIGHEST_PROTOCOL)
    logger.info(f"Saved proposals of {len(proposals['ids'])} images to {path}")


def check_proposal_file(path, dataset_name):
    """
    Check that the proposal file ``path`` (local, or a URL ``PathManager`` opens) has proposals
    for every image of the registered dataset ``dataset_name``, ids compared as strings, as
    detectron2's loader does (which also accepts Detectron1's ``indexes`` for ``ids``).

    Returns:
        int: the number of images of the dataset (all covered by the file).

    Raises:
        ValueError: one line naming the file: it does not exist, is not a readable pickle or
            not a proposal dict, or lacks some dataset image (the first one is named).
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
    ids = proposals.get("ids", proposals.get("indexes")) if isinstance(proposals, dict) else None
    if ids is None:
        raise ValueError(
            f"proposal file '{path}' is not in detectron2's proposal format (a dict with "
            "'ids', 'boxes' and 'objectness_logits')"
        )
    ids = {str(i) for i in ids}
    dataset_dicts = DatasetCatalog.get(dataset_name)
    missing = [d["image_id"] for d in dataset_dicts if str(d["image_id"]) not in ids]
    if missing:
        raise ValueError(
            f"proposal file '{path}' has no proposals for image id {missing[0]!r} of dataset "
            f"'{dataset_name}' ({len(missing)} image(s) of the dataset are missing); regenerate it "
            "for this dataset with dump_proposals.py"
        )
    return len(dataset_dicts)


def check_proposal_files(cfg, splits=("TRAIN", "TEST")):
    """
    When ``cfg.MODEL.LOAD_PROPOSALS`` is on, check that ``DATASETS.PROPOSAL_FILES_<split>``
    gives one file per dataset of ``DATASETS.<split>`` for each of ``splits`` and that every file
    covers its dataset (:func:`check_proposal_file`). Does nothing otherwise.

    Raises:
        ValueError: one line naming the config keys or the file and dataset at fault.
    """
    if not cfg.MODEL.LOAD_PROPOSALS:
        return
    for split in splits:
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
