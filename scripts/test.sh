#!/usr/bin/env bash
# Test suite: real ONNX Runtime / OpenVINO engines on real CT data. Extra arguments go to pytest.
set -euo pipefail
export MEDPTQ_LABEL=1  # the MONAI Label server test needs monailabel
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q -p no:cacheprovider "$@"
