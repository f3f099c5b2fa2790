"""
libra_d2: Libra R-CNN (Pang et al., CVPR 2019) as a detectron2 project extension.

Importing the package registers every libra_d2 component with detectron2's registries
(ROI heads, backbones, box predictors, meta-architectures) and the built-in ``libra_shapes``
datasets. Call :func:`add_libra_config` on a config before merging a libra_d2 YAML.
"""

import warnings

with warnings.catch_warnings():
    # detectron2 compiles a few functions with torch.jit when imported; torch's deprecation
    # notice for that is addressed to detectron2, not to libra_d2's users. (The entry points
    # import libra_d2 before detectron2, so that it is imported here.)
    warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
    from . import (
        data,  # noqa: F401  (registers libra_shapes_train / libra_shapes_val)
        evaluation,  # noqa: F401  (LVIS evaluation with numpy >= 1.24)
        modeling,  # noqa: F401  (registers the Libra R-CNN modules)
    )
    from .config import add_libra_config

__all__ = ["add_libra_config"]
