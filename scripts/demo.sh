#!/usr/bin/env bash
# Main job: calibrate the U-Net bundle, run FP32 and INT8 whole-volume inference on the
# real CT, write reports/demo.json and reports/demo.md. Extra arguments go to `medptq demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m medptq_monai.cli demo "$@"
