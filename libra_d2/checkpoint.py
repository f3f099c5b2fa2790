"""A detectron2 checkpointer that never runs code from a checkpoint and never leaves a torn one.

* Loading: ``.pth`` files go through ``torch.load(weights_only=True)``; detectron2-format ``.pkl``
  files (ImageNet / model-zoo weights: dicts of numpy arrays) are first read with an unpickler
  that only accepts numpy arrays and plain containers, so a crafted pickle that would execute
  code is refused with :class:`UnsafeCheckpointError` before detectron2's own loader sees it.
* Saving: every file the checkpointer writes (the checkpoint, then ``last_checkpoint``) is written
  to a temporary file in the same folder, flushed to disk and renamed into place, so a process
  killed at any moment leaves the previous checkpoint and ``last_checkpoint`` intact.
* mmdetection checkpoints (a dict with ``state_dict`` and ``meta``, e.g. the official Libra R-CNN
  weights) are converted to the model's names on load (:mod:`libra_d2.mmdet_checkpoint`); a
  checkpoint that does not fill the model by name is refused with ``MMDetCheckpointError``.
"""

import io
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .files import atomic_open
from .mmdet_checkpoint import convert_mmdet_state_dict, is_mmdet_checkpoint

__all__ = ["LibraCheckpointer", "UnsafeCheckpointError", "safe_load_pickle"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects other than tensors, arrays and plain containers."""


# Globals a detectron2 .pkl checkpoint may reference: numpy array/scalar reconstruction and
# OrderedDict. Anything else (os.system, builtins.eval, ...) is refused.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # numpy arrays pickled under Python 3 with protocol < 3
}


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load '{module}.{name}': checkpoints may only hold tensors, numpy "
            "arrays and plain containers"
        )


def safe_load_pickle(f):
    """
    Unpickle a detectron2-format ``.pkl`` checkpoint without executing code.

    Args:
        f (str or file): path or binary file object.

    Returns:
        The unpickled object (normally a dict of numpy arrays).

    Raises:
        UnsafeCheckpointError: the pickle references anything but numpy arrays and containers.
    """
    if isinstance(f, str):
        with PathManager.open(f, "rb") as fh:
            return _WeightsUnpickler(fh, encoding="latin1").load()
    return _WeightsUnpickler(f, encoding="latin1").load()


class _AtomicWritePathManager:
    """A path manager whose local writes go through :func:`atomic_open`; all else is delegated."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def open(self, path, mode="r", **kwargs):
        if "w" in mode and "://" not in path:
            return atomic_open(path, mode)
        return self._base.open(path, mode, **kwargs)


class LibraCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` with safe loading, atomic saving and mmdetection checkpoints
    (see the module docstring). Same constructor and API.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_manager = _AtomicWritePathManager(self.path_manager)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            # Vet the pickle with the restricted unpickler; detectron2's loader then reads a
            # file known to hold only arrays and containers.
            with PathManager.open(filename, "rb") as f:
                safe_load_pickle(io.BytesIO(f.read()))
        return super()._load_file(filename)

    def _torch_load(self, f):
        loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        if not is_mmdet_checkpoint(loaded):
            return loaded
        model = convert_mmdet_state_dict(loaded, model_keys=self.model.state_dict())
        self.logger.info(f"Converted the mmdetection checkpoint {f} ({len(model)} tensors)")
        return {"model": model, "__author__": "mmdetection"}
