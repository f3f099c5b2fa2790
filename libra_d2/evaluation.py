"""detectron2's LVIS evaluation with the latest lvis release on numpy >= 1.24.

lvis 0.5.3 (the latest release) casts with ``np.float``, an alias of ``float`` that numpy 1.24
removed; lvis-api's main branch has the fix, unreleased. While such an lvis is installed, importing
libra_d2 gives numpy the alias back, so that every ``LVISEvaluator`` works: ``train_net.py``'s and
one that a LazyConfig instantiates (``L(LVISEvaluator)``) alike.
"""

from importlib.metadata import PackageNotFoundError, version

import numpy as np


def lvis_needs_np_float():
    """Whether the installed lvis (0.5.3 or older) uses ``np.float`` that this numpy lacks."""
    try:
        release = tuple(int(p) for p in version("lvis").split(".")[:3])
    except (PackageNotFoundError, ValueError):
        return False
    return release <= (0, 5, 3) and not hasattr(np, "float")


if lvis_needs_np_float():
    np.float = float
