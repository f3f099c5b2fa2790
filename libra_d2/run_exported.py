"""Run an exported detector in a process that cannot import detectron2, libra_d2, fvcore or mmdet.

    python libra_d2/run_exported.py FORMAT MODEL INPUTS OUTPUTS THREADS

``FORMAT``: export (``model.pt2``, ``torch.export.load``), aoti (AOTInductor package,
``torch._inductor.aoti_load_package``), onnx (onnxruntime, CPU) or torchscript (``torch.jit.load``).
``INPUTS``: a ``torch.save`` file of a list of float32 ``(3, H, W)`` images; ``OUTPUTS``: the file
this writes, the list of each image's output tensors (``pred_boxes``, ``pred_classes``, ``scores``,
[``pred_masks``,] ``image_size``); ``THREADS``: CPU threads (torch and onnxruntime), those of the
reference it is compared with (the reduction order, hence the last bits, depend on them).

Only torch, torchvision and onnxruntime are imported: run as a script (not with ``-m``), this file
does not import its package, and an import finder refuses the blocked packages, so a model that
needs them fails here.
"""

import importlib.abc
import os
import sys

BLOCKED = ("detectron2", "libra_d2", "fvcore", "mmdet")


class BlockImports(importlib.abc.MetaPathFinder):
    """An import finder that raises ImportError for the packages in :data:`BLOCKED`."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} cannot be imported here: exported models run without it")
        return None


def load(fmt, path, threads):
    """The exported model at ``path`` as a function ``image -> tuple of tensors``."""
    import torch
    import torchvision  # noqa: F401  (registers torchvision::nms and roi_align)

    if fmt == "export":
        return torch.export.load(path).module()
    if fmt == "aoti":
        return torch._inductor.aoti_load_package(path)
    if fmt == "torchscript":
        return torch.jit.load(path)
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda image: tuple(
            torch.from_numpy(o) for o in session.run(None, {name: image.numpy()})
        )
    raise ValueError(f"unknown format {fmt!r}")


def main(argv):
    sys.meta_path.insert(0, BlockImports())
    # AOTInductor packages then check their input's sizes and strides (a view is refused)
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
    fmt, model_path, inputs_path, outputs_path, threads = argv
    import torch

    torch.set_num_threads(int(threads))
    images = torch.load(inputs_path, weights_only=False)
    model = load(fmt, model_path, int(threads))
    with torch.no_grad():
        outputs = [tuple(model(image.contiguous())) for image in images]
    torch.save(outputs, outputs_path)


if __name__ == "__main__":
    main(sys.argv[1:])
