#!/usr/bin/env python
"""tid-d2: Task Integration Distillation for detectron2.

detectron2 itself is not on PyPI: install it from its official source first
(``pip install 'git+https://github.com/facebookresearch/detectron2.git'``), or run
``make demo`` / ``make test`` which set up a complete environment on a machine without GitHub.
"""

from setuptools import find_packages, setup

setup(
    name="tid-d2",
    version="0.1.0",
    description="Task Integration Distillation (TID) for detectron2 object detectors",
    packages=find_packages(include=["tid_d2", "tid_d2.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.11",
        "pycocotools",
        "opencv-python-headless",
        "numpy<2",
        "matplotlib",
        "tqdm",
        "tensorboard",
    ],
    extras_require={"test": ["pytest"]},
)
