#!/usr/bin/env bash
# Test suite: real ONNX Runtime / OpenVINO engines on real CT data. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q -p no:cacheprovider "$@"
