"""
libra_d2: Libra R-CNN (Pang et al., CVPR 2019) as a detectron2 project extension.

Importing the package registers every libra_d2 component with detectron2's registries
(ROI heads, backbones, box predictors, meta-architectures) and the built-in ``libra_shapes``
datasets. Call :func:`add_libra_config` on a config before merging a libra_d2 YAML.
"""

from . import (
    data,  # noqa: F401  (registers libra_shapes_train / libra_shapes_val)
    modeling,  # noqa: F401  (registers the Libra R-CNN modules)
)
from .config import add_libra_config

__all__ = ["add_libra_config"]
