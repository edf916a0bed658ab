#!/usr/bin/env bash
# make gpu-check: the GPU path checked and measured in one command on a machine with a CUDA GPU.
#
#   1. a Python whose torch sees the GPU: the machine's python3 when it has one (a lent machine without a
#      network), else a CUDA torch from the package index in .venv-gpu; wheels in .whl/ (e.g. liger-kernel,
#      for the vs-Liger rows) are installed first when present;
#   2. vlmfast installed without its CPU extension or dependencies (the GPU checks need torch and triton);
#   3. the Triton kernels compiled for this GPU (TRITON_INTERPRET=0) against the naive bf16 computation:
#      tests/test_token_stats_gpu.py (on Hopper the TMA kernels, elsewhere the portable ones);
#   4. the CUDA IPC weight-sync buffer mapped by another process (tests/test_shared_buffer.py);
#   5. python -m bench --device cuda at the Qwen2.5-VL-7B head, each case written as it finishes.
#
# Everything lands in $GPU_CHECK_OUT (default bench/results): cuda_device.txt, cuda_tests.txt, cuda_ipc.txt,
# cuda.jsonl, summary_cuda.md and plots. Target: under 8 minutes on an H100/H200, install included.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 VLMFAST_NATIVE=0 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1

has_gpu() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

PY=python3
if ! has_gpu "$PY"; then
    python3 -m venv .venv-gpu && PY=.venv-gpu/bin/python
    "$PY" -m pip install --quiet --disable-pip-version-check torch triton numpy pytest pytest-timeout matplotlib \
        "setuptools>=64" wheel || exit 2
    has_gpu "$PY" || { echo "gpu-check: no CUDA GPU is visible to torch" >&2; exit 2; }
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/vlmfast-site .whl/*.whl &&
        export PYTHONPATH=/tmp/vlmfast-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! VLMFAST_BUILD_NATIVE=0 "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation -e .; then
    echo "gpu-check: could not install vlmfast into $PY (an externally managed Python? use a venv with a CUDA torch)" >&2
    exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
             'capability', torch.cuda.get_device_capability())"; } | tee "$OUT/cuda_device.txt"

status=0
timeout 300 "$PY" -m pytest tests/test_token_stats_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# the weight-sync buffer an engine in another process maps through CUDA IPC (vlmfast.rollout needs transformers)
if "$PY" -c "import transformers" 2>/dev/null; then
    timeout 120 "$PY" -m pytest tests/test_shared_buffer.py -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_ipc.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "not run: transformers is not installed in $PY" | tee "$OUT/cuda_ipc.txt"
fi
# --no-e2e: the end-to-end step needs the tiny VLM stack (transformers, pyarrow), not installed here
timeout 420 "$PY" -m bench --device cuda --models qwen25vl-7b --ops sft token_stats grpo opd dpo --tokens 2048 8192 32768 \
    --no-e2e --out "$OUT" || status=1
exit $status
