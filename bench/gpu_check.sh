#!/usr/bin/env bash
# Issue 11's GPU checks in one prepared script: everything a GPU session has to measure, in about
# four minutes, every result written under OUT (default: $OUT, the device tool's return folder).
#
# Here, before the session (the GPU machine reaches no registry and takes 64 MiB per command):
#   bash ../shared/tools/gpu/ort-gpu-parts.sh      # onnxruntime-gpu + the service's wheels -> .gpu/p0..pN
#   bash bench/gpu_check.sh --stage-wrk            # wrk and its LuaJIT library -> .gpu/wrk (optional)
# Then, on the device, one slice per command, back to back (see ../shared/tools/gpu/README.md):
#   carry [".gpu/pK"]:  mkdir -p /tmp/ortstage && cp -r .gpu/pK/* /tmp/ortstage/
#   last, carry [".gpu/pN", ".gpu/wrk"]:
#       mkdir -p /tmp/ortstage && cp -r .gpu/pN/* /tmp/ortstage/ && source /tmp/ortstage/install.sh \
#         && bash bench/gpu_check.sh
# It measures (README "GPU" lists them with the device and the date):
#   1. the CUDA provider loads for every graph; the GPU's name        -> gpu_checks.json
#   2. codes vs CPU with TF32 off and on; 3. encoder/decoder img/s at batch 256, TF32 off and on
#   4. bucket warm-up; 5. sampling latency n=1..64 on the GPU and on one CPU thread
#   6. /v1/encode with 1-image and 16-image requests, one process vs the workers layout -> serve_layouts_gpu.json
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "${1:-}" = "--stage-wrk" ]; then
  grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude  # never committed
  mkdir -p .gpu/wrk
  cp "$(command -v wrk)" .gpu/wrk/wrk
  cp "$(ldd "$(command -v wrk)" | awk '/libluajit/ {print $3}')" .gpu/wrk/
  echo "staged: $(ls .gpu/wrk)"
  exit 0
fi

out=${1:-${OUT:-bench/results/gpu}}
device=${VQTOK_CHECK_DEVICE:-cuda}  # cpu: a smoke run of this script without a GPU (figures meaningless)
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
echo "== $(date -u +%FT%TZ) $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" || exit 1

# wrk from .gpu/wrk if it was carried (and runs here), else the Python load generator in 4 processes.
load=(--load python --load-procs 4)
# (wrk --version exits 1 even when it runs; a missing library makes it print "error while loading".)
if [ -x .gpu/wrk/wrk ] && ! LD_LIBRARY_PATH=.gpu/wrk .gpu/wrk/wrk --version 2>&1 | grep -q "error while loading"; then
  export PATH=$root/.gpu/wrk:$PATH LD_LIBRARY_PATH=$root/.gpu/wrk:${LD_LIBRARY_PATH:-}
  load=(--load wrk)
fi
echo "load generator: ${load[*]}"

echo "== offline CUDA checks"
timeout 150 python3 -m bench.gpu_checks --device "$device" --out "$out/gpu_checks.json" || echo "gpu_checks failed or timed out: $?"

echo "== serving: one process vs the workers layout (the engine on CUDA, $(( $(nproc) - 2 )) front ends)"
timeout 240 python3 -m bench.serve_load --layouts --device "$device" --workers $(( $(nproc) - 2 )) "${load[@]}" \
  --images 1,16 --concurrency 1,16,64,256 --duration 3 --warmup 1 --rounds 1 --out "$out/serve_layouts_gpu.json" \
  || echo "serve_load failed or timed out: $?"
echo "== done $(date -u +%FT%TZ)"
ls -l "$out"
