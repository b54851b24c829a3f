#!/usr/bin/env bash
# The Python reference pipeline's environment (scripts/face_reference.py): a venv with pinned
# numpy, OpenCV (headless), ONNX Runtime and PyNaCl from PyPI. Used by tests/face_pipeline.rs (the Rust
# pipeline must agree with it) and by benches/face_pipeline.rs (side-by-side timing); PyNaCl by scripts/verify_receipt.py, the independent receipt check.
# Usage: scripts/setup-pyref.sh [VENV_DIR]   (default target/pyref)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-target/pyref}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import numpy, cv2, onnxruntime, nacl" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  numpy==2.4.6 opencv-python-headless==5.0.0.93 onnxruntime==1.31.1 pynacl==1.6.2
"$VENV/bin/python" -c "import numpy, cv2, onnxruntime; print('python reference:', 'numpy', numpy.__version__, 'opencv', cv2.__version__, 'onnxruntime', onnxruntime.__version__)"
