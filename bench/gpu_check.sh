#!/usr/bin/env bash
# make gpu-check: the GPU path checked and measured in one command on a machine with a CUDA GPU.
#
#   1. a Python whose torch sees the GPU: the machine's python3 when it has one (a lent machine without a
#      network), else the pinned CUDA torch (TORCH_GPU_PIN, a CUDA 13.0 build) in .venv-gpu, after checking that
#      the driver runs CUDA 13.0; wheels in .whl/ (e.g. liger-kernel, for the vs-Liger rows) are unpacked first
#      when present;
#   2. vlmfast from this checkout through PYTHONPATH (no install: nothing to fail on an externally managed
#      Python; its CPU extension is not needed, VLMFAST_NATIVE=0);
#   3. the Triton kernels compiled for this GPU (TRITON_INTERPRET=0) against the naive bf16 computation:
#      tests/test_token_stats_gpu.py (on Hopper the TMA kernels, elsewhere the portable ones);
#   4. the CUDA IPC weight-sync buffer mapped by another process (tests/test_shared_buffer.py);
#   5. python -m bench --device cuda at the Qwen2.5-VL-7B head: each op in a process of its own, killed after
#      OP_TIMEOUT_S (a hang or a sticky CUDA error ends that op only), each case written as it finishes.
#
# Everything lands in $GPU_CHECK_OUT (default bench/results): cuda_device.txt, cuda_tests.txt, cuda_ipc.txt,
# cuda.jsonl, summary_cuda.md and plots. Every step has a deadline; together at most 8 minutes after the
# install (150 s tests, 60 s IPC, 5 ops x 50 s bench).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 VLMFAST_NATIVE=0 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TORCH_GPU_PIN="torch==2.14.1 triton==3.8.0"  # the main venv's torch, the PyPI build for CUDA 13.0
TORCH_GPU_CUDA=13.0
OP_TIMEOUT_S=${OP_TIMEOUT_S:-50}

has_gpu() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# "CUDA Version: 12.8" in nvidia-smi's header: the newest CUDA the driver runs
driver_cuda() { nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" | grep -o "[0-9.]*$"; }
# version_at_least A B: A >= B, dotted
version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]; }

PY=${PY:-python3}
if ! has_gpu "$PY"; then
    have=$(driver_cuda)
    if [ -z "$have" ]; then
        echo "gpu-check: nvidia-smi sees no NVIDIA driver and $PY has no CUDA torch" >&2; exit 2
    fi
    if ! version_at_least "$have" "$TORCH_GPU_CUDA"; then
        echo "gpu-check: the driver runs CUDA $have; $TORCH_GPU_PIN is built for CUDA $TORCH_GPU_CUDA (a newer" \
             "driver, or a python3 with a CUDA torch for this one: PY=... make gpu-check)" >&2
        exit 2
    fi
    python3 -m venv .venv-gpu && PY=.venv-gpu/bin/python
    "$PY" -m pip install --quiet --disable-pip-version-check $TORCH_GPU_PIN numpy pytest pytest-timeout matplotlib \
        || exit 2
    has_gpu "$PY" || { echo "gpu-check: no CUDA GPU is visible to torch in $PY" >&2; exit 2; }
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/vlmfast-site .whl/*.whl &&
        export PYTHONPATH=/tmp/vlmfast-site:$PYTHONPATH
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
             'capability', torch.cuda.get_device_capability())"; } | tee "$OUT/cuda_device.txt"

status=0
timeout 150 "$PY" -m pytest tests/test_token_stats_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# the weight-sync buffer an engine in another process maps through CUDA IPC (vlmfast.rollout needs transformers)
if "$PY" -c "import transformers" 2>/dev/null; then
    timeout 60 "$PY" -m pytest tests/test_shared_buffer.py -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_ipc.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "not run: transformers is not installed in $PY" | tee "$OUT/cuda_ipc.txt"
fi
# --no-e2e: the end-to-end step needs the tiny VLM stack (transformers, pyarrow), not installed here
timeout 300 "$PY" -m bench --device cuda --models qwen25vl-7b --ops sft token_stats grpo opd dpo --tokens 2048 8192 32768 \
    --op-timeout "$OP_TIMEOUT_S" --no-e2e --out "$OUT" || status=1
exit $status
