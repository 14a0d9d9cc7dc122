#!/bin/sh
# The CUDA path checked on a machine with a GPU, in one run of a few minutes: the gpu tests,
# host-to-device speed, the bench's default model and 70B slice merged on the GPU against
# cp + sync, locked and GPU memory against the plan, and the GPU merge against the CPU's.
# Prints one table; without CUDA, one line (exit 1). See scripts/gpu_check.py.
set -eu
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device on this machine (no nvidia-smi); nothing was checked"
    exit 1
fi
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" scripts/gpu_check.py "$@"
