#!/usr/bin/env python
"""
Convert an mmdetection Libra R-CNN / Libra RetinaNet checkpoint to detectron2's format.

    ./convert_mmdet_checkpoint.py IN OUT

IN: a local path or URL of an mmdetection checkpoint (a dict with ``state_dict`` and ``meta``).
OUT: ``*.pth`` (``{"model": tensors}``) or ``*.pkl`` (detectron2 model-zoo format, numpy arrays),
with the names of the ``configs/COCO-Detection/*_mmdet.yaml`` models. libra_d2's own tools load IN
directly (``MODEL.WEIGHTS IN``); this file is for plain detectron2 tools.
"""

import argparse
import os
import pickle
import sys

import libra_d2  # noqa: F401  (first: see libra_d2/__init__.py)

# isort: split
import torch
from detectron2.utils.file_io import PathManager

from libra_d2.checks import SetupError, check_output_dir, fetch_weights
from libra_d2.mmdet_checkpoint import (
    MMDetCheckpointError,
    convert_mmdet_state_dict,
    is_mmdet_checkpoint,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("input", metavar="IN", help="mmdetection checkpoint (path or URL)")
    parser.add_argument("output", metavar="OUT", help="detectron2 checkpoint to write (.pth/.pkl)")
    args = parser.parse_args(argv)
    if not args.output.endswith((".pth", ".pkl")):
        parser.error(f"OUT must end with .pth or .pkl, got '{args.output}'")
    try:
        local = fetch_weights(args.input, what="IN")
        check_output_dir(os.path.dirname(os.path.abspath(args.output)), what="OUT's folder")
    except SetupError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        loaded = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises several types for files it cannot unpickle
        first_line = str(e).splitlines()[0] if str(e) else ""
        parser.exit(2, f"{parser.prog}: error: '{args.input}' cannot be loaded: {first_line}\n")
    if not is_mmdet_checkpoint(loaded):
        parser.exit(2, f"{parser.prog}: error: '{args.input}' is not an mmdetection checkpoint\n")
    try:
        model = convert_mmdet_state_dict(loaded)
    except MMDetCheckpointError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.output.endswith(".pkl"):
        with PathManager.open(args.output, "wb") as f:
            arrays = {k: v.numpy() for k, v in model.items()}
            pickle.dump({"model": arrays, "__author__": "mmdetection"}, f)
    else:
        with PathManager.open(args.output, "wb") as f:
            torch.save({"model": model, "__author__": "mmdetection"}, f)
    print(f"{args.input}: {len(model)} tensors -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
