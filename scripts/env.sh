#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: create or reuse .venv in the repository and install
# medptq-monai with its CPU engines, test tools and Ray (the cohort tests start a local Ray cluster). Re-installs only when the
# dependency files changed. torch is installed first, pinned to the CPU build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.medptq-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/constraints.txt -nt "$stamp" ]; then
    echo "installing medptq-monai and its dependencies into .venv ..."
    python -m pip install -q --upgrade pip
    python -m pip install -q -c requirements/constraints.txt "torch==2.13.0"
    # setuptools announces every editable install with a boxed "Editable installation." note: only that is hidden
    PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
        python -m pip install -q -c requirements/constraints.txt -e ".[cpu,test,cluster]"
    # nnU-Net's network library: PlainConvUNet needs only torch and numpy, but the package
    # declares timm (-> torchvision -> another torch), so it goes in without dependencies.
    python -m pip install -q --no-deps "dynamic-network-architectures==0.4.4"
    touch "$stamp"
fi
# MONAI Label (MEDPTQ_LABEL=1, set by test.sh): monailabel 0.8.5 declares torchvision and sam2,
# which would pull another torch, and pydicom-seg pins numpy<2; both go in with --no-deps and
# requirements/label.txt lists what the server really imports (see that file).
label_stamp=.venv/.medptq-label-installed
if [ "${MEDPTQ_LABEL:-0}" = 1 ] && { [ ! -f "$label_stamp" ] || [ requirements/label.txt -nt "$label_stamp" ]; }; then
    echo "installing MONAI Label into .venv ..."
    python -m pip install -q -c requirements/constraints.txt -r requirements/label.txt
    python -m pip install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
    touch "$label_stamp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
