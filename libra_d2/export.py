"""Export a libra_d2 (or detectron2) detector by tracing: TorchScript and ONNX.

Both go through detectron2's :class:`~detectron2.export.TracingAdapter`, as detectron2's
``tools/deploy/export_model.py --export-method tracing`` does: the inference of
``GeneralizedRCNN`` *without* the final resize to the original image size
(``inference(..., do_postprocess=False)``; other models: ``model([{"image": image}])``) is traced
on one image and its ``Instances`` output is flattened to a tuple of tensors.

Exported model:
    input:  ``image``, float32 ``(3, H, W)`` in ``cfg.INPUT.FORMAT`` channel order, resized like
            the test-time transform (:func:`preprocess_image`); the model normalises and pads it.
    outputs (Faster R-CNN): ``pred_boxes`` ``(R, 4)`` float32 XYXY in the coordinates of the input,
            ``pred_classes`` ``(R,)`` int64, ``scores`` ``(R,)`` float32 and ``image_size``
            ``(2,)`` int64; :func:`detections` rebuilds the ``Instances``.

The sizes the Balanced Feature Pyramid reads (``x.shape[-2:]``) are traced as ``aten::size``
values, so the traced graph also runs at other input sizes; the ONNX graph has dynamic height and
width. ONNX uses the TorchScript-based exporter (``dynamo=False``), opset >= 16 (torchvision's
``ROIAlign(aligned=True)``). Its built-in ``aten::adaptive_max_pool2d`` needs a constant output size
that divides the input size, which the BFP's is not, so :func:`onnx_symbolics` registers an exact
replacement for the duration of the export (:func:`adaptive_max_pool2d_symbolic`).
"""

import contextlib
import io
import re

import torch
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN

from .files import atomic_open

__all__ = [
    "ONNX_OPSET",
    "MIN_ONNX_OPSET",
    "ExportError",
    "preprocess_image",
    "export_torchscript",
    "check_onnx_opset",
    "export_onnx",
    "onnx_symbolics",
    "adaptive_max_pool2d_symbolic",
    "detections",
    "run_eager",
    "run_onnx",
]

ONNX_OPSET = 17
"""Default ONNX opset of :func:`export_onnx`."""
MIN_ONNX_OPSET = 16
"""Oldest opset :func:`export_onnx` accepts: torchvision exports ROIAlign(aligned=True) from 16."""


class ExportError(Exception):
    """A user-facing export problem; its message is a complete one-line explanation."""


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


def _inference_without_postprocess(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _tracing_adapter(model, image):
    """``model`` (eval mode) as a module ``image -> tuple of tensors``, in eval mode."""
    if model.training:
        raise ValueError("the model must be in eval mode (call model.eval())")
    inference = _inference_without_postprocess if isinstance(model, GeneralizedRCNN) else None
    # A new module is in training mode, and TracingAdapter.train() would switch the model too.
    return TracingAdapter(model, [{"image": image}], inference).eval()


def export_torchscript(model, image, path):
    """
    Trace ``model``'s inference on ``image`` with ``torch.jit.trace`` and save it (atomically).

    Args:
        model: a detectron2 meta-architecture in eval mode.
        image (Tensor): float32 ``(3, H, W)`` on the model's device (:func:`preprocess_image`).
        path (str): the file to write.

    Returns:
        (ScriptModule, TracingAdapter): ``traced(image) -> tuple of tensors`` (module docstring)
        and the adapter that :func:`detections` needs.
    """
    adapter = _tracing_adapter(model, image)
    traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    with atomic_open(path, "wb") as f:
        torch.jit.save(traced, f)
    return traced, adapter


# ---------------------------------------------------------------------------------------- ONNX
def _int64(g, value):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))


def _adaptive_max_pool_axis(g, x, axis, m):
    """
    Adaptive max pooling of ``x`` along ``axis`` to ``m`` bins (a 0-d int64 value).

    Bin ``i`` of an axis of length ``n`` covers ``[floor(i*n/m), ceil((i+1)*n/m))`` as in ATen.
    Every bin is read as ``k = ceil(n/m) + 1`` rows (indices clamped to the bin's last row, which
    leaves the max unchanged): ``Gather`` gives ``(..., m, k, ...)``, ``ReduceMax`` over ``k``.
    """
    n = g.op("Gather", g.op("Shape", x), _int64(g, axis), axis_i=0)
    zero, one = _int64(g, 0), _int64(g, 1)
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
    traced), exact like ATen: ``(N, C, H, W) -> (N, C, h, w)``. The indices output is not
    exported (``None``), which is all ``F.adaptive_max_pool2d(..., return_indices=False)`` needs.
    """
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._maybe_get_const(output_size, "is")
    if isinstance(sizes, (list, tuple)):
        sizes = [_int64(g, int(s)) for s in sizes]
    else:  # a list of traced sizes
        sizes = [
            g.op("Reshape", g.op("Cast", s, to_i=7), _int64(g, []))  # 0-d int64 (7: INT64)
            for s in symbolic_helper._unpack_list(output_size)
        ]
    out = _adaptive_max_pool_axis(g, input, 2, sizes[0])
    return _adaptive_max_pool_axis(g, out, 3, sizes[1]), None


@contextlib.contextmanager
def onnx_symbolics(opset_version):
    """Register :func:`adaptive_max_pool2d_symbolic` for ``opset_version`` while the context is
    active; the built-in symbolic is in effect again afterwards."""
    torch.onnx.register_custom_op_symbolic(
        "aten::adaptive_max_pool2d", adaptive_max_pool2d_symbolic, opset_version
    )
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::adaptive_max_pool2d", opset_version)


def check_onnx_opset(opset_version):
    """Raise :class:`ExportError` if ``opset_version`` is below :data:`MIN_ONNX_OPSET`."""
    if opset_version < MIN_ONNX_OPSET:
        raise ExportError(
            f"ONNX opset {opset_version} is too old: torchvision exports ROIAlign(aligned=True) "
            f"from opset {MIN_ONNX_OPSET} on"
        )


def export_onnx(model, image, path, opset_version=ONNX_OPSET):
    """
    Export ``model`` to an ONNX file (atomically) with the TorchScript-based exporter.

    Args:
        model, image: see :func:`export_torchscript`.
        path (str): the ``.onnx`` file to write.
        opset_version (int): ONNX opset, >= :data:`MIN_ONNX_OPSET`.

    Returns:
        TracingAdapter: what :func:`detections` needs. The graph has one input ``image`` with
        dynamic height and width, and outputs named after the ``Instances`` fields
        (``pred_boxes``, ``pred_classes``, ``scores``) plus ``image_size``.

    Raises:
        ExportError: the opset is too old, or an operator cannot be exported (named).
    """
    check_onnx_opset(opset_version)
    adapter = _tracing_adapter(model, image)
    instances = run_eager(adapter, image)  # also gives the adapter its outputs_schema
    names = sorted(instances.get_fields()) + ["image_size"] if instances is not None else None
    buffer = io.BytesIO()
    try:
        with onnx_symbolics(opset_version):
            torch.onnx.export(
                adapter,
                (image,),
                buffer,
                dynamo=False,
                opset_version=opset_version,
                input_names=["image"],
                output_names=names,
                dynamic_axes={"image": {1: "height", 2: "width"}},
            )
    except RuntimeError as e:  # torch.onnx.OnnxExporterError and errors of the C++ passes
        text = str(e).strip()
        op = re.search(r"\b(aten|torchvision|prim)::\w+", text)
        where = f" at operator {op.group(0)}" if op else ""
        raise ExportError(f"ONNX export failed{where}: {text.splitlines()[0]}") from e
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
    return adapter


# ---------------------------------------------------------------------------- running exports
def detections(adapter, outputs):
    """
    The ``Instances`` of flattened outputs (tensors or numpy arrays, from the adapter, a traced
    module or onnxruntime), rebuilt with ``adapter.outputs_schema``; None if the model's outputs
    are not ``[{"instances": Instances}]``.
    """
    rebuilt = adapter.outputs_schema(tuple(torch.as_tensor(o) for o in outputs))
    return rebuilt[0].get("instances") if isinstance(rebuilt[0], dict) else None


def run_eager(adapter, image):
    """Eager detections of the adapter's model on ``image`` (the reference for an export)."""
    with torch.no_grad():
        return detections(adapter, adapter(image))


def run_onnx(path, image):
    """Outputs of the ONNX model ``path`` on ``image`` (onnxruntime, CPU; ImportError without)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image.cpu().numpy()})
