#!/usr/bin/env bash
# Create (or reuse) the project-local virtual environment .venv with everything libra_d2 needs.
#
# Idempotent: a stamp file records a hash of the inputs that decide the environment; when it matches,
# the script returns at once. detectron2 is installed from the official source at a pinned commit when
# GitHub is reachable, otherwise from the PyPI repack `sal-detectron2` (sha256-checked). The path taken
# is printed and written to .venv/detectron2-install-path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIBRA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
D2_COMMIT="02b5c4e2"
D2_REPO="https://github.com/facebookresearch/detectron2"
D2_REPACK="sal-detectron2==0.7.2"
D2_REPACK_SHA256="491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"

stamp_inputs() {
  cat "$ROOT/constraints.txt" "$ROOT/setup.py" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.libra_d2-bootstrap-stamp"
WANT="$(stamp_inputs)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import detectron2, libra_d2" 2>/dev/null; then
  echo "[bootstrap] .venv is up to date (detectron2 from $(cat "$VENV/detectron2-install-path" 2>/dev/null || echo '?'))"
  exit 0
fi

echo "[bootstrap] setting up $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
C=(-c "$ROOT/constraints.txt")
pip_install() {
  # pip's "Location ... is ignored" warnings about the machine's local index folders are noise.
  "$VENV/bin/python" -m pip --disable-pip-version-check install -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

pip_install "${C[@]}" "setuptools<81" wheel
pip_install "${C[@]}" torch torchvision numpy
# detectron2's runtime dependencies (its setup.py install_requires), so either install path below
# can use --no-deps and never touch torch; then the project's tools: opencv (detectron2's
# Visualizer), pytest, ruff, onnx/onnxruntime (export checks), onnxscript (torch.onnx.export(..., dynamo=True)).
pip_install "${C[@]}" "Pillow>=7.1" matplotlib "pycocotools>=2.0.2" "termcolor>=1.1" \
  "yacs>=0.1.8" tabulate cloudpickle tqdm tensorboard "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" \
  "omegaconf>=2.1" "hydra-core>=1.1" black packaging opencv-python-headless pytest ruff \
  onnx onnxruntime onnxscript
# mmdetection, for the parity tests against the official implementation (tests/test_mmdet_parity.py).
# mmengine and mmcv-lite require opencv-python, which would overwrite opencv-python-headless's cv2:
# install the three with --no-deps, and their pure-Python requirements explicitly.
pip_install "${C[@]}" addict pyyaml rich yapf scipy shapely six terminaltables
pip_install "${C[@]}" --no-deps mmengine mmcv-lite mmdet
# lvis, for detectron2's LVISEvaluator: its metadata asks for opencv-python and Cython too, but it
# runs on numpy, matplotlib, pycocotools and cv2 (all installed above): --no-deps.
pip_install "${C[@]}" --no-deps lvis

if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  path=""
  if timeout 20 git ls-remote "$D2_REPO" HEAD >/dev/null 2>&1; then
    echo "[bootstrap] GitHub reachable: building detectron2 from source at commit $D2_COMMIT"
    if pip_install --no-deps --no-build-isolation "git+$D2_REPO@$D2_COMMIT"; then
      path="official source $D2_REPO@$D2_COMMIT"
    else
      echo "[bootstrap] source build failed; falling back to the PyPI repack"
    fi
  else
    echo "[bootstrap] GitHub not reachable: using the PyPI repack $D2_REPACK (upstream commit a59f056)"
  fi
  if [ -z "$path" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$VENV/bin/python" -m pip --disable-pip-version-check download -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
      "$D2_REPACK" -d "$tmp"
    whl="$(ls "$tmp"/*.whl)"
    got="$(sha256sum "$whl" | cut -d' ' -f1)"
    if [ "$got" != "$D2_REPACK_SHA256" ]; then
      echo "[bootstrap] ERROR: sha256 mismatch for $whl: got $got, expected $D2_REPACK_SHA256" >&2
      exit 1
    fi
    # The wheel is pure Python apart from a CPython-3.10 _C extension that other versions never load;
    # install it under a py3 tag so pip accepts it on this interpreter.
    py3="$tmp/$(basename "$whl" | sed 's/-cp310-none-any/-py3-none-any/')"
    mv "$whl" "$py3"
    pip_install --no-deps "$py3"
    path="PyPI repack $D2_REPACK (sha256 verified)"
  fi
  echo "$path" > "$VENV/detectron2-install-path"
fi
pip_install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import detectron2, libra_d2; print('[bootstrap] detectron2', detectron2.__version__, 'from', open('$VENV/detectron2-install-path').read().strip())"
echo "$WANT" > "$STAMP"
