"""Datasets of libra_d2. Importing this package registers ``libra_shapes_train`` and
``libra_shapes_val`` with detectron2 (paths only; see :func:`ensure_shapes_dataset`)."""

from .shapes import (
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    ensure_shapes_dataset,
    generate_shapes_split,
    is_shapes_dataset,
    register_libra_shapes,
)

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "ensure_shapes_dataset",
    "generate_shapes_split",
    "is_shapes_dataset",
    "register_libra_shapes",
]

register_libra_shapes()
