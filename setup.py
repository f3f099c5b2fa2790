#!/usr/bin/env python
"""libra_d2: Libra R-CNN (Pang et al., CVPR 2019) as a detectron2 project extension.

Dependencies are kept loose so that users on any CUDA build of torch can ``pip install -e .``
next to their existing detectron2; ``constraints.txt`` pins the versions verified here.
detectron2 itself is not on PyPI and is therefore not listed: install it first (see README).
"""

from setuptools import find_packages, setup

setup(
    name="libra_d2",
    version="0.1.0",
    description="Libra R-CNN (balanced learning for object detection) for detectron2",
    packages=find_packages(include=["libra_d2", "libra_d2.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.10",
        "torchvision>=0.11",
        "numpy",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        "Pillow",
    ],
    extras_require={"dev": ["pytest", "matplotlib", "ruff"]},
)
