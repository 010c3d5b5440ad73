#!/usr/bin/env bash
# The test-only OpenMMLab environment of the cross-checks (docs/cross-checks.md): the
# official code's own mmcv/mmseg/mmdet, pure-Python installs from PyPI, in a virtualenv of
# its own (it needs numpy < 2). Recipe: shared/reference/MMDET_FACTS.md.
# Usage: tools/make_mm_env.sh DIR [PYTHON]. Writes DIR/.installed last, only on success.
# Every install is held to the versions in .ci/constraints-mm.txt (MM_CONSTRAINTS names
# another file; /dev/null resolves afresh), and DIR/versions.txt gets what was installed,
# the file's next contents when moving to newer releases (docs/cross-checks.md).
set -euo pipefail

env_dir=${1:?usage: tools/make_mm_env.sh DIR [PYTHON]}
python=${2:-python3.11}
constraints=${MM_CONSTRAINTS:-$(dirname "$0")/../.ci/constraints-mm.txt}
pip=("$env_dir/bin/python" -m pip install --quiet --constraint "$constraints")

rm -rf "$env_dir"
"$python" -m venv "$env_dir"
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
# mmcv's setup.py imports pkg_resources (setuptools < 70) and builds without isolation.
"${pip[@]}" 'numpy<2' 'setuptools<70' wheel
MMCV_WITH_OPS=0 "${pip[@]}" --no-build-isolation mmcv==1.7.2
# mmcv's config pretty-printer breaks on newer yapf; opencv < 4.11 keeps numpy < 2.
"${pip[@]}" 'numpy<2' 'opencv-python<4.11' yapf==0.40.1 mmsegmentation==0.30.0 mmdet==2.28.2 timm
"${pip[@]}" 'setuptools<70' 'numpy<2'
"$env_dir/bin/python" -c 'import mmcv, mmseg, mmdet, timm, cv2, torch; print("mmcv", mmcv.__version__, "mmseg", mmseg.__version__, "mmdet", mmdet.__version__, "torch", torch.__version__)'
"$env_dir/bin/python" -m pip freeze --exclude-editable > "$env_dir/versions.txt"
touch "$env_dir/.installed"
