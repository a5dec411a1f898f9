#!/usr/bin/env bash
# Device checks of the capture path (issue 11), prepared to run in one go on a lent GPU (one H200: ~6 min).
#
#   bash bench/gpu_check.sh            # from the repository root; results in $OUT (default build/gpu-check)
#
# 1. the CUDA-path tests (summaries on the device, device-side quantisation, pinned ring, CUDA default);
# 2. bench_capture --full-size on CUDA: off / last-2 without and with summaries / all 18, B=1 and B=10,
#    with writer GB/s, deepest queue, time waited, peak host RSS and peak device memory per configuration;
# 3. bench_writer on this machine's CPU cores (1, 4, 8) with full-size rows (18 layers, 293 MB per env).
# Needs torch with CUDA and lerobot; on a machine with torch but no lerobot, a wheelhouse/ of the other
# wheels (built elsewhere: pip download lerobot[pi]==0.6.1 minus torch) is installed into .gpu first.
set -uo pipefail
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
if ! "$PY" -c "import torch, lerobot; assert torch.cuda.is_available()" 2>/dev/null; then
  if [ -d wheelhouse ]; then
    python3 -m venv --system-site-packages .gpu && .gpu/bin/pip install -q --no-index --find-links wheelhouse wheelhouse/*.whl
    PY=.gpu/bin/python
    export PYTHONPATH=src:tests
  else
    PY=python3
    export PYTHONPATH=src:tests
  fi
fi
{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nproc; } \
  > "$OUT/machine.txt" 2>&1
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/log.txt"; }

step "CUDA-path tests"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_summary.py tests/test_writer_throughput.py \
  -k "cuda or device or plan or batched or quantise" 2>&1 | tee "$OUT/tests.txt" | tail -5

step "full-size capture, B=1 and B=10"
timeout 420 "$PY" bench/bench_capture.py --full-size --device cuda --reps 3 --inferences 3 --batch-size 1,10 \
  2>&1 | tee "$OUT/full_size.txt" | tail -30

step "writer alone on this machine's cores, full-size rows"
timeout 180 "$PY" bench/bench_writer.py --rows 4 --repeats 2 --layers 18 --cores 1,4,8 2>&1 | tee "$OUT/writer.txt"
step "done"
