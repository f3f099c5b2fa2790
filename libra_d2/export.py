"""Export a libra_d2 (or detectron2) detector for deployment: TorchScript by tracing, and ONNX.

Both formats go through detectron2's :class:`~detectron2.export.TracingAdapter`, as detectron2's
``tools/deploy/export_model.py`` does with ``--export-method tracing``: the model is run on one
image, the inference *without* the final resize to the original image size
(``GeneralizedRCNN.inference(..., do_postprocess=False)``) is traced, and its ``Instances`` output
is flattened to a tuple of tensors.

Exported model:
    input:  ``image``, float32 ``(3, H, W)``, in ``cfg.INPUT.FORMAT`` channel order, already
            resized like the test-time transform (:func:`preprocess_image`); the model normalises
            and pads it itself.
    outputs (Faster R-CNN): ``pred_boxes`` ``(R, 4)`` float32 XYXY in the coordinates of the
            input image, ``pred_classes`` ``(R,)`` int64, ``scores`` ``(R,)`` float32,
            ``image_size`` ``(2,)`` int64 ``(H, W)``; ``R <= TEST.DETECTIONS_PER_IMAGE``.
            ``adapter.outputs_schema(outputs)`` rebuilds ``[{"instances": Instances}]``.

Input sizes. Under ``torch.jit.trace`` the shapes that the Balanced Feature Pyramid reads
(``x.shape[-2:]``, passed to ``F.adaptive_max_pool2d`` and ``F.interpolate(size=...)``) are
recorded as ``aten::size`` values, not constants, so the traced graph also runs at other input
sizes (checked at 224x224, 256x256, 200x300 and 192x288 against eager inference). Only the
traced size is *guaranteed* by tracing, though: deploy at the size you traced with, or check the
others. The ONNX graph is exported with dynamic height and width (``dynamic_size=True``).

ONNX. Only the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used; the
``torch.export``-based one needs the ``onnxscript`` package. Its built-in symbolic for
``aten::adaptive_max_pool2d`` cannot export the BFP: it requires a constant ``output_size`` (the
BFP's comes from traced shapes: "adaptive pooling, since output_size is not constant") and, even
with constants, an input size divisible by the output size (P4 14x14 -> P6 4x4 at 224x224 is not).
:func:`onnx_symbolics` therefore registers, for the duration of the export only, an exact
replacement (:func:`adaptive_max_pool2d_symbolic`: per-axis ``Gather`` of every bin's rows +
``ReduceMax``, any sizes, dynamic or constant). The opset must be >= 16: ``ROIAlign`` with
``aligned=True`` (torchvision's symbolic) needs 16 and ``scaled_dot_product_attention`` (the BFP
non-local block) needs 14.
"""

import contextlib
import io
import re
import warnings
from typing import Dict

import torch
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances

from .checkpoint import atomic_open

__all__ = [
    "ONNX_OPSET",
    "MIN_ONNX_OPSET",
    "ExportError",
    "read_image",
    "preprocess_image",
    "build_tracing_adapter",
    "trace_model",
    "export_torchscript",
    "export_onnx",
    "onnx_symbolics",
    "adaptive_max_pool2d_symbolic",
    "run_eager",
    "run_torchscript",
    "run_onnx",
    "compare_detections",
]

ONNX_OPSET = 17
"""Default ONNX opset of :func:`export_onnx`."""
MIN_ONNX_OPSET = 16
"""Oldest opset :func:`export_onnx` accepts: torchvision exports ROIAlign(aligned=True) from 16."""


class ExportError(Exception):
    """A user-facing export problem; its message is a complete one-line explanation."""


# ------------------------------------------------------------------------------------------------
# Sample input
# ------------------------------------------------------------------------------------------------
def read_image(path, image_format):
    """
    Read an image file as detectron2's ``DefaultPredictor`` input.

    Args:
        path (str): image file.
        image_format (str): ``cfg.INPUT.FORMAT`` ("BGR", "RGB", ...).

    Returns:
        ndarray: ``(H, W, 3)`` uint8 in ``image_format`` order.

    Raises:
        ExportError: the file is missing or is not a readable image.
    """
    try:
        return detection_utils.read_image(path, format=image_format)
    except FileNotFoundError:
        raise ExportError(f"image '{path}' does not exist") from None
    except Exception as e:  # PIL raises several types for unreadable or truncated files
        raise ExportError(f"'{path}' cannot be read as an image ({type(e).__name__})") from None


def preprocess_image(cfg, original_image):
    """
    Resize an image as ``DefaultPredictor`` does (``ResizeShortestEdge`` to
    ``INPUT.MIN_SIZE_TEST``, at most ``INPUT.MAX_SIZE_TEST``) and make it a model input.

    Args:
        original_image (ndarray): ``(H, W, 3)`` in ``cfg.INPUT.FORMAT`` order.

    Returns:
        Tensor: float32 ``(3, H', W')``.
    """
    aug = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    image = aug.get_transform(original_image).apply_image(original_image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


# ------------------------------------------------------------------------------------------------
# Tracing
# ------------------------------------------------------------------------------------------------
def _inference_without_postprocess(model, inputs):
    """``GeneralizedRCNN`` inference without the resize to the original size."""
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _device(model):
    return next(model.parameters()).device


def build_tracing_adapter(model, image):
    """
    Wrap ``model`` so that it maps an image tensor to a tuple of tensors.

    Args:
        model (nn.Module): a detectron2 meta-architecture in eval mode. ``GeneralizedRCNN``
            (Faster R-CNN, Libra Faster R-CNN) runs ``inference(do_postprocess=False)``; other
            models (RetinaNet) are called as ``model([{"image": image}])``.
        image (Tensor): float32 ``(3, H, W)``, see :func:`preprocess_image`.

    Returns:
        TracingAdapter: in eval mode; ``adapter(image)`` returns the flattened outputs
        (module docstring) and ``adapter.outputs_schema`` rebuilds them after a first call.
    """
    if model.training:
        raise ValueError("the model must be in eval mode (call model.eval())")
    if image.dim() != 3:
        raise ValueError(f"image must be a (C, H, W) tensor, got shape {tuple(image.shape)}")
    image = image.to(_device(model))
    inference = _inference_without_postprocess if isinstance(model, GeneralizedRCNN) else None
    # A new module is in training mode; torch.onnx.export restores the mode it found, and
    # TracingAdapter.train(True) would put the wrapped model back into training mode.
    return TracingAdapter(model, [{"image": image}], inference).eval()


@contextlib.contextmanager
def _quiet_tracing():
    """Hide the TracerWarnings about Python values in detectron2's and libra_d2's checks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def trace_model(model, image):
    """
    Trace ``model``'s inference on ``image`` with ``torch.jit.trace``.

    Args:
        model, image: see :func:`build_tracing_adapter`.

    Returns:
        (ScriptModule, TracingAdapter): the traced module, ``traced(image) -> tuple of tensors``
        (module docstring), and the adapter whose ``outputs_schema`` rebuilds the outputs.
    """
    adapter = build_tracing_adapter(model, image)
    with _quiet_tracing():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    return traced, adapter


def export_torchscript(model, image, path):
    """
    Trace ``model`` (:func:`trace_model`) and save it with ``torch.jit.save`` (atomically).

    Returns:
        (ScriptModule, TracingAdapter): as :func:`trace_model`.
    """
    traced, adapter = trace_model(model, image)
    with atomic_open(path, "wb") as f:
        torch.jit.save(traced, f)
    return traced, adapter


# ------------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------------
def _int64(g, value):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))


def _as_scalar(g, value):
    """A traced size (an element of a packed int list) as a 0-d int64 ONNX value."""
    return g.op("Reshape", g.op("Cast", value, to_i=7), _int64(g, []))  # 7: INT64


def _adaptive_max_pool_axis(g, x, axis, out_size):
    """
    Adaptive max pooling of ``x`` along one spatial ``axis`` to ``out_size`` bins.

    Bin ``i`` of an axis of length ``n`` covers ``[floor(i*n/m), ceil((i+1)*n/m))`` as in ATen.
    Every bin is read as ``k = ceil(n/m) + 1`` rows (indices clamped to the bin's last row, which
    leaves the max unchanged): ``Gather`` gives ``(..., m, k, ...)``, ``ReduceMax`` over ``k``.
    """
    n = g.op("Gather", g.op("Shape", x), _int64(g, axis), axis_i=0)
    m, zero, one = out_size, _int64(g, 0), _int64(g, 1)
    i = g.op("Range", zero, m, one)
    start = g.op("Div", g.op("Mul", i, n), m)
    end = g.op("Div", g.op("Add", g.op("Mul", g.op("Add", i, one), n), g.op("Sub", m, one)), m)
    k = g.op("Add", g.op("Div", g.op("Add", n, g.op("Sub", m, one)), m), one)
    offsets = g.op("Reshape", g.op("Range", zero, k, one), _int64(g, [1, -1]))
    index = g.op("Add", g.op("Reshape", start, _int64(g, [-1, 1])), offsets)
    index = g.op("Min", index, g.op("Reshape", g.op("Sub", end, one), _int64(g, [-1, 1])))
    gathered = g.op("Gather", x, index, axis_i=axis)  # (..., m, k, ...)
    if g.opset >= 18:
        return g.op("ReduceMax", gathered, _int64(g, [axis + 1]), keepdims_i=0)
    return g.op("ReduceMax", gathered, axes_i=[axis + 1], keepdims_i=0)


def adaptive_max_pool2d_symbolic(g, input, output_size):
    """
    ONNX symbolic of ``aten::adaptive_max_pool2d`` for any input and output sizes (constant or
    traced), exact like ATen. Input ``(N, C, H, W)`` -> ``(N, C, h, w)``; the indices output is
    not exported (``None``), which is all ``F.adaptive_max_pool2d(..., return_indices=False)``
    needs. Opsets 11 and up.
    """
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._maybe_get_const(output_size, "is")
    if isinstance(sizes, (list, tuple)):
        sizes = [_int64(g, int(s)) for s in sizes]
    elif symbolic_helper._is_packed_list(output_size):
        sizes = [_as_scalar(g, s) for s in symbolic_helper._unpack_list(output_size)]
    else:
        return symbolic_helper._unimplemented(
            "adaptive_max_pool2d", "output_size is neither a constant nor a list", output_size
        )
    out = _adaptive_max_pool_axis(g, input, 2, sizes[0])
    out = _adaptive_max_pool_axis(g, out, 3, sizes[1])
    return out, None


_SYMBOLICS = {"aten::adaptive_max_pool2d": adaptive_max_pool2d_symbolic}


@contextlib.contextmanager
def onnx_symbolics(opset_version):
    """
    Register libra_d2's ONNX symbolics (``aten::adaptive_max_pool2d``, see the module docstring)
    for ``opset_version`` while the context is active, and unregister them on exit, so the
    built-in ones are in effect again.
    """
    for name, fn in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset_version)
    try:
        yield
    finally:
        for name in _SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, opset_version)


def _onnx_failure(e):
    """One line naming the operator that failed to export, from a torch.onnx exception."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    op = re.search(r"operator '([\w:.]+)'", first)
    if op is None:
        op = re.search(r"\b(aten::\w+|torchvision::\w+|prim::\w+)", text)
    where = f" at operator {op.group(1)}" if op else ""
    return f"ONNX export failed{where}: {first}"


def export_onnx(model, image, path, opset_version=ONNX_OPSET, dynamic_size=True):
    """
    Export ``model`` to an ONNX file with the TorchScript-based exporter.

    Args:
        model, image: see :func:`build_tracing_adapter`.
        path (str): the ``.onnx`` file to write (atomically).
        opset_version (int): ONNX opset, >= 16.
        dynamic_size (bool): export the image height and width as dynamic axes.

    Returns:
        TracingAdapter: its ``outputs_schema`` rebuilds the outputs of the ONNX model; its
        graph has one input ``image`` and outputs named after the ``Instances`` fields
        (``pred_boxes``, ``pred_classes``, ``scores``) plus ``image_size``.

    Raises:
        ExportError: the opset is too old, or an operator cannot be exported (the message
            names it).
    """
    if opset_version < MIN_ONNX_OPSET:
        raise ExportError(
            f"ONNX opset {opset_version} is too old: torchvision exports ROIAlign(aligned=True) "
            f"from opset {MIN_ONNX_OPSET} on"
        )
    adapter = build_tracing_adapter(model, image)
    image = adapter.flattened_inputs[0]
    output_names = _output_names(run_eager(adapter, image))
    buffer = io.BytesIO()
    try:
        with _quiet_tracing(), onnx_symbolics(opset_version), warnings.catch_warnings():
            # The TorchScript-based exporter is chosen on purpose (module docstring).
            warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                adapter,
                (image,),
                buffer,
                dynamo=False,
                opset_version=opset_version,
                input_names=["image"],
                output_names=output_names,
                dynamic_axes={"image": {1: "height", 2: "width"}} if dynamic_size else None,
            )
    except RuntimeError as e:  # torch.onnx.OnnxExporterError and errors of the C++ passes
        raise ExportError(_onnx_failure(e)) from e
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
    return adapter


def _output_names(instances):
    """Names of the flattened outputs: the ``Instances`` fields, sorted, then ``image_size``."""
    if instances is None:
        return None  # let the exporter number them
    return sorted(instances.get_fields()) + ["image_size"]


# ------------------------------------------------------------------------------------------------
# Running and comparing
# ------------------------------------------------------------------------------------------------
def _instances(outputs):
    """The ``Instances`` of the first image of rebuilt model outputs, or None."""
    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], dict):
        instances = outputs[0].get("instances")
        return instances if isinstance(instances, Instances) else None
    return None


def run_eager(adapter, image):
    """
    Eager inference through the adapter's model (the reference for an exported model).

    Returns:
        Instances: detections on ``image`` (coordinates of ``image``).
    """
    with torch.no_grad():
        outputs = adapter(image.to(_device(adapter.model)))
    return _instances(adapter.outputs_schema(outputs))  # the schema is known after a first call


def run_torchscript(traced, adapter, image):
    """
    Run a traced (or ``torch.jit.load``-ed) model on ``image``.

    Returns:
        Instances: rebuilt with ``adapter.outputs_schema``.
    """
    with torch.no_grad():
        outputs = traced(image.to(_device(adapter.model)))
    return _instances(adapter.outputs_schema(outputs))


def run_onnx(path, adapter, image):
    """
    Run an exported ONNX model on ``image`` with onnxruntime (CPU).

    Returns:
        Instances: rebuilt with ``adapter.outputs_schema``.

    Raises:
        ImportError: onnxruntime is not installed.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: image.cpu().numpy()})
    return _instances(adapter.outputs_schema(tuple(torch.from_numpy(o) for o in outputs)))


def compare_detections(expected, actual) -> Dict[str, float]:
    """
    Compare two detection results box by box (same order expected: both come from the same
    deterministic graph).

    Args:
        expected, actual (Instances): with ``pred_boxes``, ``scores`` and ``pred_classes``.

    Returns:
        dict: ``boxes`` and ``scores``, the max absolute differences (``inf`` when the numbers
        of detections or their classes differ, 0 for two empty results), and ``num_expected``,
        ``num_actual``.
    """
    result = {"num_expected": len(expected), "num_actual": len(actual)}
    same = len(expected) == len(actual) and torch.equal(
        expected.pred_classes.cpu(), actual.pred_classes.cpu()
    )
    if not same:
        return {**result, "boxes": float("inf"), "scores": float("inf")}

    def max_diff(a, b) -> float:
        return (a.cpu().double() - b.cpu().double()).abs().max().item() if a.numel() else 0.0

    boxes = max_diff(expected.pred_boxes.tensor, actual.pred_boxes.tensor)
    return {**result, "boxes": boxes, "scores": max_diff(expected.scores, actual.scores)}
